{{/*
Names, labels and the checks every template shares.
*/}}

{{/* The chart name, overridable; cut to 63 characters (the DNS label limit). */}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-<chart> unless the release already holds the chart's name. */}}
{{- define "relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of a component's objects: <fullname>-<suffix>, still within 63 characters. */}}
{{- define "relay.componentName" -}}
{{- $full := include "relay.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $full .suffix }}
{{- end }}

{{- define "relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "relay.labels" -}}
helm.sh/chart: {{ include "relay.chart" . }}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select pods: stable across upgrades (never the chart version). */}}
{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Component labels: `include "relay.componentLabels" (dict "root" $ "component" "controller")`. */}}
{{- define "relay.componentLabels" -}}
{{ include "relay.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "relay.componentSelectorLabels" -}}
{{ include "relay.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false (name an existing ServiceAccount)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relay.controllerImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The claim holding snapshots and checkpoints: the existing one, or the one this chart creates. */}}
{{- define "relay.claimName" -}}
{{- if .Values.persistence.create }}
{{- if .Values.persistence.existingClaim }}
{{- fail "persistence.existingClaim is set but persistence.create is true: set persistence.create=false to use the existing claim" }}
{{- end }}
{{- .Values.persistence.claimName }}
{{- else }}
{{- required "persistence.existingClaim is required when persistence.create is false" .Values.persistence.existingClaim }}
{{- end }}
{{- end }}

{{/* The Temporal frontend the controller connects to: explicit, from a Secret (empty here), or the embedded server. */}}
{{- define "relay.temporalAddress" -}}
{{- $t := .Values.temporal }}
{{- if and $t.address $t.addressFromSecret.name }}
{{- fail "temporal.address and temporal.addressFromSecret.name are both set: choose one" }}
{{- end }}
{{- if $t.address }}
{{- $t.address }}
{{- else if $t.addressFromSecret.name }}
{{- /* the controller reads RELAY_TEMPORAL_ADDRESS from the Secret */ -}}
{{- else if $t.embedded.enabled }}
{{- printf "%s:%d" (include "relay.componentName" (dict "root" . "suffix" "temporal")) (int $t.embedded.grpcPort) }}
{{- else }}
{{- fail "temporal.address is required when temporal.embedded.enabled is false (or set temporal.addressFromSecret.name)" }}
{{- end }}
{{- end }}

{{/* Namespaces the controller watches (a list), in the order given; the release namespace by default. */}}
{{- define "relay.watchNamespaces" -}}
{{- if .Values.controller.watch.namespaces }}
{{- toYaml (uniq .Values.controller.watch.namespaces) }}
{{- else }}
{{- toYaml (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{- define "relay.tlsMountPath" -}}/etc/relay/temporal-tls{{- end }}

{{/*
`relay controller --policy` as JSON: the policy values, with the registry of the chart's own images (the folder
of image.repository) always among the allowed registries.
*/}}
{{- define "relay.policy" -}}
{{- $own := dir .Values.image.repository -}}
{{- $registries := .Values.policy.imageRegistries -}}
{{- if ne $own "." }}{{ $registries = prepend $registries $own | uniq }}{{ end -}}
{{- dict "priorityClasses" .Values.policy.priorityClasses "tolerations" .Values.policy.tolerations "imageRegistries" $registries | toJson -}}
{{- end }}
