# Two commands matter on a fresh machine: `make demo` and `make test`.
# `make install` is idempotent: it only reinstalls when pyproject.toml changed, and only
# rebuilds the CPU kernels (src/lmstack/kernels) when their sources or the install changed.
PY      ?= python3
# Where torch comes from. Empty (the default): whatever index pip is configured with (PyPI
# unless pip.conf / PIP_INDEX_URL say otherwise). On Linux x86_64 PyPI's torch is the CUDA
# build, which pulls ~20 nvidia-*/triton packages (several GB). For the CPU-only build:
#     make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (To switch an existing .venv to another build, `make clean` first.)
TORCH_INDEX ?=
TORCH   := torch==2.13.0
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
KDIR    := src/lmstack/kernels
KSTAMP  := $(KDIR)/_build/.attempted

.PHONY: install kernels ref llamacpp demo test bench clean

install: $(STAMP) $(KSTAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned, from TORCH_INDEX when given (see the top of this file); the
	# package install below then finds it satisfied and keeps it.
	$(VPY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )$(TORCH)
	$(VPY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

# The CPU kernels (quantized linear, paged attention, decode linear). A machine that cannot
# build them (no compiler, no ninja) gets one warning here and the pure-PyTorch path at run
# time, never a failed install; the stamp records the attempt, so a failed build is retried
# only when the sources change.
$(KSTAMP): $(STAMP) $(KDIR)/quant_linear.cpp $(KDIR)/quant_linear_a8.cpp $(KDIR)/paged_attention.cpp \
		$(KDIR)/dense_linear.cpp $(KDIR)/pool.h $(KDIR)/paged_attention.h $(KDIR)/decode_step.cpp \
		$(KDIR)/quant_dequantize.cpp $(KDIR)/quant_codes.h $(KDIR)/build.py
	$(VPY) -m lmstack.kernels.build
	mkdir -p $(dir $(KSTAMP)) && touch $(KSTAMP)

kernels:
	rm -f $(KSTAMP)
	$(MAKE) $(KSTAMP)

# Optional: the heavy test references (lm-eval's HFLM, TRL's trainers); their tests skip
# without them. torch stays pinned so pip cannot swap the build.
ref: install
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(VPY) -m pip install -q -c $(VENV)/torch-pin.txt -e ".[ref]"

# Optional: llama.cpp through llama-cpp-python, the reference that runs our GGUF exports
# (tests/quant/test_export_llamacpp.py skips without it). It compiles llama.cpp from source
# (~5 min on 2 cores); torch stays pinned so pip cannot swap the CPU build for another.
llamacpp: install
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(VPY) -m pip install -c $(VENV)/torch-pin.txt "llama-cpp-python>=0.3"

demo: install
	$(VENV)/bin/lmstack run

test: install
	bash scripts/ensure_chromium.sh || true
	$(VPY) -m pytest -q

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache $(KDIR)/_build
