"""Test support, not shipped: a Kubernetes without containers and the stand-in trainers that run on it.

The envtest control plane (`control_plane`), a kubelet that runs pods as local processes (`process_kubelet`),
the objects a bare control plane lacks (`objects`), the stand-in trainer and scale-benchmark leg the pods run
(`standin_trainer`, `standin_leg`), the stand-in below the local backend (`standin_local_trainer`), and envtest
lent to the Kubernetes drill with the kubelet as its node harness (`drill`; `python -m relay_testing.drill` runs
`relay drill --backend kubernetes` on a fresh envtest). Used by the cluster test tier, `make drill` and the
benchmarks; never in the wheel or an image (the `[tool.setuptools]` packages do not list it), importable from
the repository root.
"""
