"""Generation: blending adapters into a model (blend), the session app.py and the CLI share (session), and
`sdlora generate` (cli)."""
