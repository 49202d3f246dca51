"""The `viewpipe` command (installed as `viewpipe.tools`): bench, state; convert, pretrain and eval join later."""
