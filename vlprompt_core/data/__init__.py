"""Loading images: on-disk layouts, few-shot sampling and the reference transforms.

One module per concern, all re-exported here (``from vlprompt_core.data import ...``
works for every name): :mod:`~vlprompt_core.data.paths` (data root, ``~``, paths kept
inside their folder, class names in prompts), :mod:`~vlprompt_core.data.scan` (what a
layout scanner returns), the layouts on disk -- :mod:`~vlprompt_core.data.splitfiles`
(benchmark split files), :mod:`~vlprompt_core.data.folders` (class folders) and
:mod:`~vlprompt_core.data.lists` (per-split text lists, a user's CSV or JSON) --,
:mod:`~vlprompt_core.data.fewshot` (K shots per class), :mod:`~vlprompt_core.data.images`
(transforms, reading an image, the image dataset), :mod:`~vlprompt_core.data.loader`
(batches through a DataLoader) and :mod:`~vlprompt_core.data.classes` (what every loaded
dataset must be -- real, distinct classes -- and the fingerprint of what it holds)."""

from __future__ import annotations

from .classes import (
    alike_names,
    alike_problem,
    check_dataset,
    check_plan,
    class_count_problem,
    class_key,
    data_fingerprint,
    dataset_problems,
    user_classes,
)
from .fewshot import sample_few_shot
from .folders import (
    IMAGE_SUFFIXES,
    FolderScan,
    class_folder_problems,
    folder_class_dirs,
    has_split_dirs,
    load_class_folders,
    match_class_dirs,
    scan_class_dirs,
    scan_class_folders,
    split_per_class,
)
from .images import (
    ImageDataset,
    Unreadable,
    UnreadableImages,
    collate_readable,
    read_rgb,
    test_transform,
    train_transform,
)
from .lists import items_from_rows, load_csv, load_json_list, scan_image_lists
from .loader import UNREADABLE_POLICIES, ImageLoader, ShuffledBatches
from .paths import default_data_root, expand_user, inside, prompt_name
from .scan import SHOWN, SPLITS, Scan
from .splitfiles import load_split_file, read_split_json, scan_split_file

__all__ = [
    # paths and names
    "default_data_root",
    "expand_user",
    "inside",
    "prompt_name",
    # what a layout scanner returns
    "SHOWN",
    "SPLITS",
    "Scan",
    # layouts: split files
    "load_split_file",
    "read_split_json",
    "scan_split_file",
    # layouts: class folders
    "IMAGE_SUFFIXES",
    "FolderScan",
    "class_folder_problems",
    "folder_class_dirs",
    "has_split_dirs",
    "load_class_folders",
    "match_class_dirs",
    "scan_class_dirs",
    "scan_class_folders",
    "split_per_class",
    # layouts: lists of images
    "items_from_rows",
    "load_csv",
    "load_json_list",
    "scan_image_lists",
    # what every dataset must be, and what it holds
    "alike_names",
    "alike_problem",
    "check_dataset",
    "check_plan",
    "class_count_problem",
    "class_key",
    "data_fingerprint",
    "dataset_problems",
    "user_classes",
    # few-shot sampling
    "sample_few_shot",
    # transforms and reading images
    "ImageDataset",
    "Unreadable",
    "UnreadableImages",
    "collate_readable",
    "read_rgb",
    "test_transform",
    "train_transform",
    # batches
    "UNREADABLE_POLICIES",
    "ImageLoader",
    "ShuffledBatches",
]
