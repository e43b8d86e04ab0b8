"""A local Kubernetes without containers: the envtest control plane and a kubelet that runs pods as processes.

Used by the cluster test tier, `relay drill --backend kubernetes` and the Kubernetes benchmarks.
"""
