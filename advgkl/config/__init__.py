"""The run configuration, torch-free: typed sections (`sections`), the methods' own settings and
what travels with each method (`methods`), how a config's values reach its method (`binding`),
and building, validating, printing and saving a config (`build`). Library code below the CLI and
the trainer takes keyword arguments; this wing turns a YAML file into them."""

from advgkl.config.build import (build_config, config_to_dict, dump_config, load_config,
                                 parse_override, read_yaml, save_config)
from advgkl.config.fields import linf_size_problem, parse_number
from advgkl.config.sections import (AttackConfig, AwpConfig, Config, DataConfig, DistillConfig,
                                    EvalConfig, LossConfig, ModelConfig, RunConfig, TrainConfig)
from advgkl.errors import ConfigError

__all__ = ["AttackConfig", "AwpConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
           "EvalConfig", "LossConfig", "ModelConfig", "RunConfig", "TrainConfig", "build_config",
           "config_to_dict", "dump_config", "linf_size_problem", "load_config", "parse_number",
           "parse_override", "read_yaml", "save_config"]
