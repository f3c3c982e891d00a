"""``python -m difftune <command> ...`` is the ``difftune`` command (also under ``accelerate launch -m
difftune <command> ...``); see `difftune.commands`."""

from .commands import main

if __name__ == "__main__":
    main()
