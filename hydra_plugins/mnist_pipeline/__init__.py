"""Registers the pipeline's config schema when Hydra scans for plugins.

DVC composes `params.yaml` with Hydra in its own process (`dvc exp run -S ...`), where
`pipeline` is never imported; DVC scans the project root for `hydra_plugins`, so
importing the schema here makes `pipeline_schema` in `conf/config.yaml` resolvable.
"""

import pipeline.config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
