"""The `viewpipe` command (installed as `viewpipe.tools`): `cli.py` parses it and runs `state`; one module per
other subcommand: `bench.py`, `convert.py`, `pretrain.py` (pretrain and demo), `evaluate.py` (eval) and
`quality.py`."""
