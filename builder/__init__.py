"""d3m-build: the producer side, one module per stage.

settings (BuildSettings, RunOptions, model defaults, check_settings) -> sources (real images) ->
pipeline (build_archive, build, build_class: patches, inversion, labelling, guards, per class) ->
workdir (checkpoints) -> assemble (labels, manifest, write, merge); shards, teachers; cli (d3m-build).
"""
