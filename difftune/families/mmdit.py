"""Target terms of MMDiT transformers (SD3, FLUX.1): joint attention over image and text tokens, with
projections and a feed-forward network of the text stream's own."""

from __future__ import annotations

JOINT_ATTENTION = (r"add_q_proj|add_k_proj|add_v_proj|to_add_out",
                   "add_q/k/v_proj, to_add_out of the joint blocks")
CONTEXT_FEED_FORWARD = (r"ff_context\.net\.(0\.proj|2)", "ff_context of the joint blocks")
