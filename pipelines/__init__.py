"""Loader backends (installed as `viewpipe.pipelines`): each turns a dataset plus the live SampleState into
`Batch`es of augmented views. Every backend is a `Loader` subclass registered by name (`get_backend`); the
shared parts live in `config` (what a loader is asked for), `plan` (epoch order, batch plans, substitutes),
`position` (position, resume, overlap), `finish` (the augmenter per view group) and `base` (`Loader`)."""

from viewpipe.pipelines.base import (BACKENDS, Batch, Loader, Samples, backends, default_backend, get_backend,
                                     make_loader, register)
from viewpipe.pipelines.config import (DaliOptions, FfcvOptions, LoaderConfig, ReferenceOptions, ViewGroup,
                                       parse_views)
from viewpipe.pipelines.plan import epoch_batches, epoch_order

__all__ = ["BACKENDS", "Batch", "DaliOptions", "FfcvOptions", "Loader", "LoaderConfig", "ReferenceOptions", "Samples",
           "ViewGroup", "backends", "default_backend", "epoch_batches", "epoch_order", "get_backend", "make_loader",
           "parse_views", "register"]
