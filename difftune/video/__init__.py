"""Video for any family whose denoiser takes clips (`ModelFamily.video`): reading clips for training,
writing the clips a model samples, and the frame strips people look at.

* `difftune.video.clips`: decode a clip (mp4/webm/mkv/mov through PyAV, the ``video`` extra; animated
  WebP/GIF through Pillow; a folder of frames; a still image as a one-frame clip) and encode one
  (animated WebP, always; mp4 where PyAV is installed), frame strips;
* `difftune.video.data`: a training folder of clips with their captions, checked before any model
  loads, frame selection (``--num_frames``, ``--frame_stride`` / ``--fps``, frame-count buckets) and the
  pixels of a clip at ``--resolution``;
* `difftune.metrics.video`: CLIP-T / CLIP-I per frame and temporal consistency.
"""
