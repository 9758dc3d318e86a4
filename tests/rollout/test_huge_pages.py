"""parallel/huge_pages.py: the CPU rollout's KV caches on mappings advised for huge pages, reused between
waves and never while a view of an earlier tensor on them is alive."""

from __future__ import annotations

import ctypes
import gc
import mmap
from pathlib import Path

import pytest
import torch

from megatron_grm.parallel import huge_pages
from megatron_grm.parallel.cpu_decode import head_major_kv, is_head_major

SHAPE = (3, 2, 700, 64)  # 1.07 MB of fp32: one 2 MiB mapping


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_tensor_is_zeroed_when_asked_and_its_mapping_reused_only_after_its_last_view_dies():
    pool = huge_pages.HugePagePool()
    first = pool.empty(SHAPE, torch.float32)
    assert first.shape == SHAPE and first.dtype == torch.float32 and first.is_contiguous()
    first.fill_(7.0)
    address = first.data_ptr()
    view = first.permute(2, 0, 1, 3)[5:9]
    del first
    gc.collect()
    assert pool.idle_bytes() == 0  # a view still reads it
    second = pool.empty(SHAPE, torch.float32).zero_()
    assert second.data_ptr() != address and bool((view == 7.0).all())
    del view
    gc.collect()
    assert pool.idle_bytes() == huge_pages.HUGE_PAGE
    third = pool.empty((2, 2, 700, 64), torch.bfloat16)  # smaller, other dtype: the idle mapping fits it
    assert third.data_ptr() == address and pool.idle_bytes() == 0
    assert pool.mapped_bytes == 2 * huge_pages.HUGE_PAGE


def test_a_larger_request_grows_the_largest_idle_mapping_with_its_pages_and_leaves_the_others_idle():
    pool = huge_pages.HugePagePool()
    page_floats = huge_pages.HUGE_PAGE // 4
    small = pool.empty((1024,), torch.float32)  # one page
    medium = pool.empty((page_floats + 1,), torch.float32)  # two pages
    medium.fill_(5.0)
    assert pool.mapped_bytes == 3 * huge_pages.HUGE_PAGE
    del small, medium
    gc.collect()
    assert pool.idle_bytes() == 3 * huge_pages.HUGE_PAGE
    bigger = pool.empty((2 * page_floats + 1,), torch.float32)  # three pages: no idle mapping fits
    # The two-page mapping grew by one page, its pages moved along (what was written there is still there);
    # the one-page mapping stays idle for smaller requests.
    assert bool((bigger[:page_floats + 1] == 5.0).all())
    assert pool.mapped_bytes == 4 * huge_pages.HUGE_PAGE and pool.idle_bytes() == huge_pages.HUGE_PAGE
    if huge_pages.transparent_huge_pages() != "never":
        assert "hg" in _vm_flags(bigger.data_ptr())  # the advice moved with it
    bigger.fill_(1.0)
    assert float(bigger.sum()) == 2 * page_floats + 1
    assert pool.empty((1024,), torch.float32).numel() == 1024 and pool.mapped_bytes == 4 * huge_pages.HUGE_PAGE
    del bigger
    gc.collect()
    assert pool.release() == 4 * huge_pages.HUGE_PAGE
    assert pool.mapped_bytes == 0 and pool.idle_bytes() == 0


def test_where_a_mapping_cannot_grow_it_is_unmapped_and_a_new_one_mapped(monkeypatch):
    class NoResize(mmap.mmap):  # a platform without mremap
        def resize(self, newsize):
            raise SystemError("mmap: resizing not available--no mremap()")

    monkeypatch.setattr(huge_pages.mmap, "mmap", NoResize)
    pool = huge_pages.HugePagePool()
    pool.empty((1024,), torch.float32)  # dies at once: idle
    gc.collect()
    bigger = pool.empty((huge_pages.HUGE_PAGE // 4 + 1,), torch.float32)
    assert pool.mapped_bytes == 2 * huge_pages.HUGE_PAGE and pool.idle_bytes() == 0
    bigger.fill_(1.0)
    assert float(bigger.sum()) == bigger.numel()


def test_pool_memory_is_advised_for_huge_pages():
    if huge_pages.transparent_huge_pages() == "never":
        pytest.skip("this kernel grants no transparent huge pages")
    pool = huge_pages.HugePagePool()
    tensor = pool.empty(SHAPE, torch.float32)
    assert "hg" in _vm_flags(tensor.data_ptr())  # MADV_HUGEPAGE on its mapping
    # The same kind of mapping without the advice lacks the flag. (Not a torch tensor: under
    # host_memory.keep_freed_host_memory, which an earlier test in the process may have applied, torch's
    # blocks come from the heap, where NumPy advises its own large arrays for huge pages.)
    plain = mmap.mmap(-1, huge_pages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert "hg" not in _vm_flags(ctypes.addressof(ctypes.c_char.from_buffer(plain)))


def test_head_major_caches_come_from_the_pool_zeroed_and_the_switch_turns_it_off(monkeypatch):
    if huge_pages.pool() is None:
        pytest.skip("this kernel grants no transparent huge pages")
    huge_pages.pool().release()  # no idle mapping left from other tests: the next one freed is this cache's
    cache = head_major_kv(700, 3, 2, 64, torch.float32)
    assert is_head_major(cache) and "hg" in _vm_flags(cache.data_ptr())
    cache.fill_(3.0)
    address = cache.data_ptr()
    del cache
    gc.collect()
    again = head_major_kv(700, 3, 2, 64, torch.float32, zeros=True)  # the same mapping, written before
    assert again.data_ptr() == address and not bool(again.any())
    pool, mapped = huge_pages.pool(), huge_pages.pool().mapped_bytes
    monkeypatch.setenv(huge_pages.DISABLE_VARIABLE, "0")
    assert huge_pages.pool() is None
    plain = head_major_kv(700, 3, 2, 64, torch.float32, zeros=True)
    assert is_head_major(plain) and not bool(plain.any())
    # torch's memory, not the pool's: with no idle mapping (``again`` holds the only one) a request would have
    # mapped more. (Its VmFlags prove nothing: NumPy advises its large arrays on the heap torch shares.)
    assert pool.mapped_bytes == mapped and pool.idle_bytes() == 0


def test_the_mode_is_read_from_the_kernels_setting(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert huge_pages.transparent_huge_pages() == "never"  # no such file
    for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                       ("always madvise [never]\n", "never")):
        setting.write_text(text)
        assert huge_pages.transparent_huge_pages() == mode


def test_a_mapping_in_use_is_never_closed():
    pool = huge_pages.HugePagePool()
    held = pool.empty((1024,), torch.float32)
    pool.empty((1024,), torch.float32)  # dies at once: idle
    gc.collect()
    assert pool.release() == huge_pages.HUGE_PAGE
    held.fill_(2.0)  # still mapped
    assert float(ctypes.c_float.from_address(held.data_ptr()).value) == 2.0


def test_the_gemms_packed_weights_come_from_the_pool_in_the_kernels_layout():
    from megatron_grm.parallel import cpu_decode_kernel

    if huge_pages.pool() is None:
        pytest.skip("this kernel grants no transparent huge pages")
    if not cpu_decode_kernel.available(torch.float32):
        pytest.skip(f"C++ GEMM unavailable: {cpu_decode_kernel.unavailable_reason()}")
    pool = huge_pages.pool()
    lent = pool.mapped_bytes - pool.idle_bytes()
    weight = torch.randn(40, 24)
    packed = cpu_decode_kernel.pack_linear_weight(weight)
    assert pool.mapped_bytes - pool.idle_bytes() > lent  # the pool lent it (heap blocks may carry 'hg' too)
    assert "hg" in _vm_flags(packed.data_ptr())
    x = torch.randn(5, 24)
    torch.testing.assert_close(cpu_decode_kernel.packed_linear(x, packed, 40), x @ weight.T, rtol=1e-5, atol=1e-5)
