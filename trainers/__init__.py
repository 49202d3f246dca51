"""Trainers (installed as `viewpipe.trainers`): self-supervised methods on one engine.

- `engine.py` the training loop; `optim.py` optimizers and the lr schedule; `checkpoint.py` checkpoint files and
  RNG states.
- The run's configuration: `config.py` loads it (and translates it into the loader's settings), over
  `schema.py` (the dataclasses), `overrides.py` (`key=value`), `validation.py` (the checks) and
  `confighelp.py` (`--help-config`).
- `base.py` the `Method` interface and the method registry; one module per method, each registering its class
  with `@register(name)`: `mocov2.py`, `simsiam.py`, `csml.py`, `snclr.py`, `simclr.py`, `byol.py`.
- `updaters.py` the state-updater protocol: passes over the whole dataset published to the sample state, which
  a method declares and the engine runs (`ccrop.py` ContrastiveCrop's boxes, `csml.py` CsMl's neighbours);
  `clean.py` those passes' clean images.
- `eval.py` the kNN monitor and the linear probe; `models.py` backbones and heads.

Importing the package imports the method modules, so that the registry knows every method by its config name.
The dependency direction is tools → trainers → pipelines → viewpipe.
"""

# importing a method module registers its method; error messages list them in this order
from . import mocov2, simsiam, csml, snclr, simclr, byol  # noqa: F401, I001
