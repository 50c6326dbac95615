"""Ensemble-and-distillation toolkit for small-image classification (PyTorch + timm)."""
from .augment import apply_views, batch_flip_lr, mixup_cutmix, sample_view_params, trivial_augment
from .data import (CourseData, DataError, decode_image, fit_to_square, load_course_folder, load_image_files,
                   rgb_to_server_grey)
from .splits import ClassBalancedSampler, stratified_folds, stratified_split
from .engine import NonFiniteLossError, Trainer, warmup_cosine
from .io import atomic_save, atomic_write_json, atomic_write_text
from .losses import dist_loss, kd_loss, lskd_loss, soft_cross_entropy
from .student import ContractError, exec_architecture, load_student
from .backbones import TeacherError, create_backbone
from .ensemble import Ensemble, load_ensemble
from .teachers import Teacher, build_teacher, load_teacher, predict_logits, save_teacher
from .trunk import TrunkSplit

__all__ = [
    "apply_views", "batch_flip_lr", "mixup_cutmix", "sample_view_params", "trivial_augment",
    "ClassBalancedSampler", "CourseData", "DataError", "decode_image", "fit_to_square",
    "load_course_folder", "load_image_files", "rgb_to_server_grey", "stratified_folds",
    "stratified_split", "NonFiniteLossError", "Trainer", "warmup_cosine", "atomic_save",
    "atomic_write_json", "atomic_write_text", "dist_loss", "kd_loss", "lskd_loss",
    "soft_cross_entropy", "ContractError", "exec_architecture", "load_student", "Ensemble",
    "Teacher", "TeacherError", "build_teacher", "load_ensemble", "load_teacher", "predict_logits",
    "save_teacher", "create_backbone", "TrunkSplit",
]
