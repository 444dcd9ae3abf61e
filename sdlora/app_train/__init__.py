"""app.py's Train tab: the dataset (a folder under --data-root or uploads), the settings form generated from
TrainConfig, and the training jobs, each a `sdlora train` process of its own, run one at a time from a queue.

`form` turns TrainConfig's fields into the page's settings (and back into `sdlora train` flags), `dataset` holds the
path and upload rules and the scan report, `jobs` runs the processes and reads their --progress-file, `tab` is the
Gradio layout and its handlers. Only `tab` imports Gradio.
"""
