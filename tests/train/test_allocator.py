"""train/allocator.py: inside `kept_heap` freed blocks are allocated again without page faults; leaving gives
the memory back."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# A fresh process (malloc's thresholds at glibc's defaults), one thread (the pattern is the main thread's): the
# page faults it takes to allocate eight 1 MiB tensors again after freeing eight, outside and inside kept_heap,
# and its resident memory (MiB) with 64 of them freed inside, then after leaving.
PROBE = textwrap.dedent(
    """
    import json, os, resource, torch
    from tuneship.train.allocator import kept_heap

    torch.set_num_threads(1)
    BLOCK = 256 * 1024  # floats: 1 MiB

    def faults_to_allocate_again(count=8):
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [torch.ones(BLOCK) for _ in range(count)]
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    outside = faults_to_allocate_again()
    with kept_heap():
        inside = faults_to_allocate_again()
        blocks = [torch.ones(BLOCK) for _ in range(64)]
        del blocks
        kept = resident_mib()
    print(json.dumps({"outside": outside, "inside": inside, "kept": kept, "after": resident_mib()}))
    """
)


def test_a_kept_heap_allocates_freed_memory_again_without_faults_and_gives_it_back_after():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout.splitlines()[-1])
    pages = 8 * 2**20 // 4096
    assert probe["outside"] > pages * 3 / 4  # glibc gave the freed top of its heap back: it faults in again
    assert probe["inside"] < pages / 4
    assert probe["kept"] - probe["after"] > 48  # the 64 freed blocks, given back on leaving
