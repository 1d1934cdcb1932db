"""Knowledge distillation of an ensemble into a compact student, and `nasdose distill`.

The teacher's predictions are cached once (`teacher`), the student learns from the reference
dose and the teacher through the training engine's pluggable objective (`losses`; feature hints
at paired U-Net levels: `levels`), or from teacher members trained beside it, possibly on
privileged inputs (`concurrent`, `mode: concurrent`); its architecture is named by a short spec
(`nas_dose.models.spec`), `report` compares it with the ensemble, the best member and its own
architecture trained without distillation, and `distill` is the stage (`Config`, `Inputs`, `run`).
"""
from .losses import AdversarialConfig, Discriminator, DistillObjective, HintConfig
from .teacher import TeacherDataset, ensure_cache, teacher_key

__all__ = ["AdversarialConfig", "Discriminator", "DistillObjective", "HintConfig", "TeacherDataset", "ensure_cache",
           "teacher_key"]
