"""Trainers (installed as `viewpipe.trainers`): self-supervised methods on one engine.

- `engine.py` the training loop; `optim.py` optimizers and the lr schedule; `checkpoint.py` checkpoint files and
  RNG states; `config.py` the run's configuration.
- `base.py` the `Method` interface and the method registry; one module per method, each registering its class
  with `@register(name)`: `mocov2.py`, `simsiam.py`, `csml.py`, `snclr.py`.
- `ccrop.py` ContrastiveCrop's box updater; `clean.py` the clean-image passes over the whole dataset.
- `eval.py` the kNN monitor and the linear probe; `models.py` backbones and heads.

Importing the package imports the method modules, so that the registry knows every method by its config name.
The dependency direction is tools → trainers → pipelines → viewpipe.
"""

# importing a method module registers its method; error messages list them in this order
from . import mocov2, simsiam, csml, snclr  # noqa: F401, I001
