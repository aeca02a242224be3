{{/* Names, labels and the pieces of configuration several templates share. */}}

{{- define "embedq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedq.fullname" -}}
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

{{- define "embedq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "embedq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "embedq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{/* The exporter's pods: the same name and instance, another component, so that neither
the workers' selector (Deployment, Service, PDB) nor KEDA ever counts them. */}}
{{- define "embedq.exporterSelectorLabels" -}}
app.kubernetes.io/name: {{ include "embedq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: exporter
{{- end }}

{{- define "embedq.exporterLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "embedq.exporterSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The gateway's pods: another component, outside the workers' selectors and KEDA. */}}
{{- define "embedq.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "embedq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "embedq.gatewayLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "embedq.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "embedq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the Redis password and the Milvus token. */}}
{{- define "embedq.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-credentials" (include "embedq.fullname" .) }}
{{- end }}
{{- end }}

{{- define "embedq.usesSecret" -}}
{{- if or .Values.redis.auth .Values.milvus.auth (and .Values.gateway.enabled .Values.gateway.requireApiKeys) }}true{{- end }}
{{- end }}

{{/*
The Redis URL with the password as a reference: Kubernetes expands $(REDIS_PASSWORD) from
the env var defined before it, so the password itself never appears in the Deployment.
A password with URL-reserved characters must be stored percent-encoded.
*/}}
{{- define "embedq.redisUrl" -}}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls.enabled -}}
{{- $auth := "" -}}
{{- if .Values.redis.auth -}}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" .Values.redis.username -}}
{{- end -}}
{{- $query := "" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.caSecret -}}
{{- $query = printf "?ssl_ca_certs=/etc/embedq/redis-ca/%s" .Values.redis.tls.caKey -}}
{{- end -}}
{{- printf "%s://%s%s:%d/%d%s" $scheme $auth .Values.redis.host (int .Values.redis.port) (int .Values.redis.database) $query -}}
{{- end }}

{{/* Env entries for Redis: the password reference first, then the URL that uses it. */}}
{{- define "embedq.redisEnv" -}}
{{- if .Values.redis.username }}
- name: REDIS_USERNAME
  value: {{ .Values.redis.username | quote }}
{{- end }}
{{- if .Values.redis.auth }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "embedq.secretName" . }}
      key: {{ .Values.secrets.keys.redisPassword }}
{{- end }}
- name: EMBEDQ_REDIS_URL
  value: {{ include "embedq.redisUrl" . | quote }}
- name: EMBEDQ_STREAM
  value: {{ .Values.stream.name | quote }}
- name: EMBEDQ_GROUP
  value: {{ .Values.stream.group | quote }}
- name: EMBEDQ_PARTITIONS
  value: {{ .Values.stream.partitions | quote }}
{{- if .Values.redis.cluster }}
- name: EMBEDQ_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- end }}

{{/*
Partition stream i of (list .Values.stream i): the stream itself with one partition, else
<name>:{p<i>} (embedq.core.keys.partition_streams).
*/}}
{{- define "embedq.partitionStream" -}}
{{- $stream := index . 0 -}}
{{- $i := index . 1 -}}
{{- if gt (int $stream.partitions) 1 -}}
{{- printf "%s:{p%d}" $stream.name $i -}}
{{- else -}}
{{- $stream.name -}}
{{- end -}}
{{- end }}

{{- define "embedq.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}
