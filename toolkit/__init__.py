"""Ensemble-and-distillation toolkit for small-image classification."""
from .data import (CourseData, DataError, ClassBalancedSampler, decode_image, fit_to_square,
                   load_course_folder, load_image_files, rgb_to_server_grey, stratified_folds,
                   stratified_split)
from .io import atomic_save, atomic_write_json, atomic_write_text
from .student import ContractError, exec_architecture, load_student

__all__ = ["CourseData", "DataError", "ClassBalancedSampler", "decode_image", "fit_to_square",
           "load_course_folder", "load_image_files", "rgb_to_server_grey", "stratified_folds",
           "stratified_split", "atomic_save", "atomic_write_json", "atomic_write_text",
           "ContractError", "exec_architecture", "load_student"]
