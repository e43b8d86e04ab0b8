{{/*
The rules the controller needs: the same set as manifests/rbac/controller.yaml, whose README lists the API
call behind each verb (tests/helm/test_chart.py checks the two agree; tests/kubernetes/test_helm_install.py
runs the controller with nothing else).
*/}}
{{- define "relay.controllerRules" -}}
- apiGroups: ["relay.dev"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch", "create", "delete"]
- apiGroups: ["relay.dev"]
  resources: ["trainingruns/status"]
  verbs: ["patch"]
- apiGroups: ["relay.dev"]
  resources: ["trainingruns/finalizers"]
  verbs: ["update"]
- apiGroups: ["relay.dev"]
  resources: ["trainingsweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["relay.dev"]
  resources: ["trainingsweeps/status"]
  verbs: ["patch"]
- apiGroups: ["relay.dev"]
  resources: ["trainingsweeps/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
{{- end }}
