"""The configs shipped with viewpipe (installed as `viewpipe.configs`): `viewpipe pretrain --config NAME` finds
NAME.yaml here (viewpipe.trainers.config.find_config)."""
