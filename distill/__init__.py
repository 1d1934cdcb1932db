"""Knowledge distillation of an ensemble into a compact student, and `nasdose distill`.

The teacher's predictions are cached once (`teacher`), the student learns from the reference
dose and the teacher through the training engine's pluggable objective (`losses`), its
architecture is named by a short spec (`student`), and `report` compares it with the ensemble,
the best member and its own architecture trained without distillation.
"""
from .losses import AdversarialConfig, Discriminator, DistillObjective, HintConfig
from .student import resolve_student, scale_genotype
from .teacher import TeacherDataset, ensure_cache, teacher_key

__all__ = ["AdversarialConfig", "Discriminator", "DistillObjective", "HintConfig", "resolve_student",
           "scale_genotype", "TeacherDataset", "ensure_cache", "teacher_key"]
