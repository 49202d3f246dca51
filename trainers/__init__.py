"""Trainers (installed as `viewpipe.trainers`): one file per method on a shared engine.

Nothing here yet: MoCo v2, SimSiam, CsMl and SNCLR and their box and neighbour updaters arrive with their
issues. The dependency direction is tools → trainers → pipelines → viewpipe.
"""
