"""Offline teacher: record each sample's augmentation and the teacher's top-k output once.

``kdfast cache build`` runs the teacher over E augmentation epochs of the training split
and stores, for every (epoch, sample), the augmentation actually applied and the teacher's
sparse output on exactly that crop; training replays the crop and never runs the teacher.
The cache is keyed by (epoch, sample) *and* carries the crop itself, so the student can be
shown the very image the teacher saw (a cache keyed by the sample alone could not).

**Folder layout** (one folder):

* ``manifest.json`` — format name and version; the teacher (architecture, checkpoint file
  name and SHA-256); the dataset's fingerprint (folders: SHA-256 of the classes and of the
  training split's sorted file list with each file's size and class; digits: of the
  split's images and labels) and its root; the classes, C, the number of samples N, the
  channels and image size; the transform (its rule, in words; see
  :data:`kdfast.data.augment.TRAIN_TRANSFORM`); the seed; E; k; the value and index
  dtypes; the temperatures; ``amp``; the teacher's batch; the samples per shard; the
  record's numpy dtype and size; where it was built (device, PyTorch, threads); and, once
  finished, ``complete: true`` with every shard's name, epoch, first sample, count, bytes
  and SHA-256.
* ``epoch-EEEE.part-PPPPP.npy`` — numpy ``.npy`` files (``np.load(..., mmap_mode="r")``),
  one structured record per sample, samples ``P·S … P·S + S − 1`` of epoch E (S =
  ``shard_samples``, default 65,536; ImageNet: 20 parts per epoch). Each is written under a
  temporary name, flushed, fsynced, renamed, then the folder is fsynced: a shard with its
  final name is complete. A killed build resumes from them.

**Record** (packed, :func:`kdfast.cache.format.record_dtype`): ``box`` int16[4] (left,
top, right, bottom, source-image pixels), ``flip`` uint8, ``mix_kind`` uint8,
``mix_partner`` int32, ``mix_lambda`` float16 (reserved for mixup/cutmix; none recorded
yet), ``indices`` int16[k] (int32 when C > 32767), ``values`` float16[k] (bfloat16 or
float32 by option), ``log_sum_exp`` float32[T]. At k = 10, fp16 values and the default
two temperatures (1 and 4): 8 + 1 + 1 + 4 + 2 + 20 + 20 + 8 = **64 bytes per sample per
epoch** (ImageNet-1k: 82 MB per epoch).

**What the rest of the row becomes**: :mod:`kdfast.sparse_teacher` (uniform remainder,
exact when k = C).

**Determinism and processes**: :mod:`kdfast.cache.build` (bytes identical for any number
of ranks and across kills and resumes; the teacher batch is part of the settings).
"""

from kdfast.cache.build import build_cache, dataset_fingerprint
from kdfast.cache.format import CacheError, CacheMismatchError
from kdfast.cache.reader import CachedBatch, CacheReport, TeacherCache, cache_info, verify_cache
from kdfast.sparse_teacher import SparseTeacher

__all__ = ["CacheError", "CacheMismatchError", "CacheReport", "CachedBatch", "SparseTeacher", "TeacherCache",
           "build_cache", "cache_info", "dataset_fingerprint", "verify_cache"]
