"""Scoring adapters: `sdlora eval` (`command`); on the toy model, a hand-written judge of what an image shows
(`toy_judge`) and the subject and prompt fidelity it gives (`toy_score`); on real models, DreamBooth's CLIP-I,
CLIP-T and DINO (`dreambooth_metrics`, run by `real_model`)."""
