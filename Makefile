# daxfs: the two commands are `make run` (mount a default image at ./mnt) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
DAXFS   := $(VENV)/bin/daxfs
IMAGE   ?= daxfs.img
MNT     ?= mnt
SIZE    ?= 1G
APT_PKGS := fuse3 libfuse3-dev pkg-config gcc fio attr python3-venv
STAMP   := $(VENV)/.installed

.PHONY: setup system-packages run umount test bench bench-short clean crash-test fuzz-images \
        kill-test exercise race

setup: system-packages $(STAMP)

# Debian packages (needs root, as in CI); skipped when all are present already.
system-packages:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	    echo "installing $(APT_PKGS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

# every C source, header and the linker map: a new file cannot be forgotten here
$(STAMP): pyproject.toml setup.py $(wildcard daxfs/*.c daxfs/*.h daxfs/*.map)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# mount(8) runs `daxfs` for `-t fuse.daxfs` (via /sbin/mount.fuse), so put it on PATH
	-ln -sf $(abspath $(DAXFS)) /usr/local/bin/daxfs
	# and mkfs -t daxfs / fsck -t daxfs run mkfs.daxfs / fsck.daxfs from PATH
	-ln -sf $(abspath $(VENV)/bin/mkfs.daxfs) /usr/local/bin/mkfs.daxfs
	-ln -sf $(abspath $(VENV)/bin/fsck.daxfs) /usr/local/bin/fsck.daxfs
	touch $(STAMP)

run: setup
	@test -e $(IMAGE) || $(DAXFS) mkfs $(IMAGE) --size $(SIZE)
	@mkdir -p $(MNT)
	$(DAXFS) mount $(IMAGE) $(MNT)
	@echo "daxfs mounted at $(MNT); unmount with: make umount"

umount:
	$(DAXFS) umount $(MNT)

test: setup
	$(PY) -m pytest -q

# fio suite in one run against tmpfs (/dev/shm), fresh daxfs images (both modes) and the peers
# (libfuse's C passthrough_ll with and without writeback cache, pyfuse3's passthroughfs.py; built
# and fetched into build/bench-peers/); results/<time>/
BENCH_TARGETS := --daxfs --dax --writeback --uring --peers
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) scripts/bench.py --full $(BENCH_TARGETS)

bench-short: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) scripts/bench.py --short $(BENCH_TARGETS)

clean:
	rm -rf build *.egg-info daxfs/*.so .pytest_cache

# crash-state exploration (persist points, kill and power-loss models); BUDGET=60 stops after ~60 s
BUDGET ?=
crash-test: setup
	$(PY) scripts/crash_explore.py --model both --jobs 2 $(if $(BUDGET),--budget $(BUDGET),)

# corruption fuzzer: damaged images through fsck, the engine, fsck --repair and a few real mounts
CASES   ?= 1000
SEED    ?= 1
fuzz-images: setup
	$(PY) scripts/fuzz_images.py --cases $(CASES) --seed $(SEED)

# kill -9 of the daemon at random moments of real workloads on a real mount (cp -a, fio, mmap,
# reflink + COW), then recovery and checks; POINTS kill points (~4 s each), point i uses SEED+i
POINTS  ?= 60
kill-test: setup
	$(PY) scripts/kill_explore.py --points $(POINTS) --seed $(SEED)

# data-path exerciser (issue 9): OPS random syscalls from SEED on a fresh mount, checked against a
# byte model; MODE=full: a near-full image (ENOSPC); AVOID=otrunc,... steers around known defects.
# Ends with "N operations, M mismatches"; a mismatch is shrunk and printed as a Python snippet.
# MOUNT_OPTS=writeback runs it on a -o writeback mount (normal mode only).
OPS     ?= 10000
MODE    ?= normal
AVOID   ?=
MOUNT_OPTS ?=
exercise: setup
	$(PY) -m tests.harness.exerciser --ops $(OPS) --seed $(SEED) --mode $(MODE) \
	    $(if $(AVOID),--avoid $(AVOID),) $(if $(MOUNT_OPTS),--mount-opts $(MOUNT_OPTS),)

# the racer: writers, a mutator (punch, zero, copy_file_range), a cloner and a reader at once on one
# mount, so the C data plane's writes and COW breaks race Python's reflinks; every byte checked
# (tests/harness/racer.py). Ends "... 0 mismatches" or FAILED with what raced with what.
# KILL_RATE=0.3: kill -9 the daemon in that share of the phases, then fsck, remount and check that
# every acknowledged write is there (not with MOUNT_OPTS=writeback).
PHASES  ?= 25
KILL_RATE ?= 0
race: setup
	$(PY) -m tests.harness.racer --seed $(SEED) --phases $(PHASES) --kill-rate $(KILL_RATE) \
	    $(if $(MOUNT_OPTS),--mount-opts $(MOUNT_OPTS),)
