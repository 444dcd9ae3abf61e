"""Training data, before any model loads: image files (`images`), captions and prompts (`captions`), aspect-ratio
buckets (`buckets`), the examples of a run (`examples`), the batch schedule (`schedule`), kohya's concept folders
(`kohya_folders`) and `sdlora scan` (`scan_command`)."""
