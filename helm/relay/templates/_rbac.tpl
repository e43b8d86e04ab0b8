{{/*
The rules the controller needs, in one place; tests/helm checks them against manifests/rbac/ and the
envtest install test proves them against a real API server. Keep both in step with the controller's calls.
*/}}
{{- define "relay.controllerRules" -}}
- apiGroups: ["relay.dev"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["relay.dev"]
  resources: ["trainingruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
