{{/*
The rules the controller needs, derived from the calls it makes; tests/helm checks them against
manifests/rbac/ and tests/kubernetes/test_helm_install.py runs the controller with nothing else.
- trainingruns: kopf lists/watches them and patches finalizers and progress annotations; the backend reads
  a run's uid for owner references.
- trainingruns/status: the status sink patches it.
- jobs: one per leg (create, get, patch parallelism to 0 on stop, deletecollection on cleanup), watched by
  the informer.
- pods: watched by the informer, deleted to stop a leg.
- persistentvolumeclaims: get, to refuse a run whose claim does not exist.
- events: created by the status sink and by kopf.
*/}}
{{- define "relay.controllerRules" -}}
- apiGroups: ["relay.dev"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["relay.dev"]
  resources: ["trainingruns/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "deletecollection"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
