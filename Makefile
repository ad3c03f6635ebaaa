# rook-rbd: the commands a user and CI need. `make help` lists them.
SHELL := /bin/bash
CEPH_DEV_DIR ?= $(CURDIR)/.dev-cluster
export CEPH_DEV_DIR
GOBIN ?= $(HOME)/go/bin
CSI_SANITY_VERSION := v5.4.0
CSI_SANITY := $(GOBIN)/csi-sanity

.PHONY: help deps build release test unit sanity demo bench ceph-up ceph-down lint clean fresh-root-check e2e e2e-full

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

deps: ## install build and test dependencies (Debian packages, csi-sanity)
	bash scripts/install-deps.sh

build: ## debug build
	cargo build --locked

release: ## optimised build (bench, Docker)
	cargo build --locked --release

ceph-up: ## start the single-node dev Ceph cluster in $(CEPH_DEV_DIR)
	bash scripts/ceph-dev.sh up $(CEPH_DEV_DIR)

ceph-down: ## stop the dev cluster and remove its data
	bash scripts/ceph-dev.sh down $(CEPH_DEV_DIR)

test: deps ## everything: lint, unit and integration tests, csi-sanity (mount and block) on a real cluster
	bash scripts/test.sh

unit: ## unit tests only (no cluster)
	cargo test --locked --lib --bins

sanity: ## csi-sanity against a running dev cluster (ACCESS=mount|block)
	bash sanity-tests/run.sh $(or $(ACCESS),mount)

demo: deps ## a real volume's life on a real dev cluster, step by step with timings
	bash scripts/demo.sh

bench: deps ## benchmarks against the dev cluster, with raw-librbd floor ratios
	bash scripts/bench.sh

e2e: deps ## real Kubernetes v1.34 in a netns: kubectl apply -f deploy/, the user's path, the storage e2e CI subset, faults
	bash k8s-tests/run.sh

e2e-full: deps ## as e2e, with every storage e2e spec a single node can run
	E2E_SUITE=full bash k8s-tests/run.sh

fresh-root-check: ## make demo in a fresh Debian 12 root (mmdebstrap): proves `make deps` is complete
	bash scripts/fresh-root-check.sh

lint: ## rustfmt and clippy, warnings are errors
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

clean:
	cargo clean
