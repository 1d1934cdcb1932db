"""Training one network: its configuration, losses, optimizer and schedule, the pluggable
objective, and the engine (exact resume, data-parallel under torchrun)."""
from .config import DataConfig, OptimConfig, PriorConfig, ScheduleConfig, TrainConfig
from .engine import TrainResult, train_model, validate
from .events import EventLog, LoggingConfig
from .losses import ConsistencyConfig, DVHLossConfig, dose_errors_gy, masked_loss
from .objective import Objective

__all__ = ["DataConfig", "OptimConfig", "PriorConfig", "ScheduleConfig", "TrainConfig", "TrainResult", "train_model",
           "validate", "ConsistencyConfig", "DVHLossConfig", "dose_errors_gy", "masked_loss", "Objective", "EventLog",
           "LoggingConfig"]
