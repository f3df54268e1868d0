{{/* Chart name, overridable. */}}
{{- define "imagepub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name used for every object. */}}
{{- define "imagepub.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "imagepub.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "imagepub.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "imagepub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "imagepub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "api"). */}}
{{- define "imagepub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagepub.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "imagepub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "imagepub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagepub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagepub.secretName" -}}
{{- default (include "imagepub.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Environment shared by the API and the workers. */}}
{{- define "imagepub.env" -}}
- name: IMAGEPUB_CONFIG
  value: /etc/imagepub/imagepub.yaml
- name: IMAGEPUB_REDIS_URL
{{- if .Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
{{- else }}
  value: {{ required "redis.url or redis.existingSecret.name is required" .Values.redis.url | quote }}
{{- end }}
{{- with .Values.aws.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.aws.ecrEndpointUrl }}
- name: AWS_ENDPOINT_URL_ECR
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Rolls the pods when the configuration changes. */}}
{{- define "imagepub.configChecksum" -}}
checksum/config: {{ toYaml .Values.config | sha256sum }}
{{- end }}

{{/*
The worker's liveness check, run as `python -c`; call with the age limit in seconds.
Exits 0 while the supervisor's alive file (IMAGEPUB_WORKER_ALIVE_FILE, by default
/tmp/imagepub-worker.alive) is at most that old, and 1 with a reason otherwise.
*/}}
{{- define "imagepub.workerAliveCheck" -}}
import os, sys, time; path = os.environ.get('IMAGEPUB_WORKER_ALIVE_FILE') or '/tmp/imagepub-worker.alive'; age = time.time() - os.path.getmtime(path) if os.path.exists(path) else None; sys.exit(0 if age is not None and age <= {{ . }} else path + (' is missing' if age is None else f' was last touched {age:.0f}s ago (limit {{ . }}s)'))
{{- end }}

{{/*
The artifact store's volume, when `config.artifacts` is a directory: one volume every API and
worker pod mounts at its path (a pod's own disk would hide an upload from the worker that
runs its job). An s3 store needs none: the API spools to /tmp, workers fetch into /tmp.
*/}}
{{- define "imagepub.artifactsVolumeMount" -}}
{{- $artifacts := .Values.config.artifacts | default dict }}
{{- if eq ($artifacts.type | default "") "directory" }}
- name: artifacts
  mountPath: {{ required "config.artifacts.path is required for type: directory" $artifacts.path }}
{{- end }}
{{- end }}

{{- define "imagepub.artifactsVolume" -}}
{{- $artifacts := .Values.config.artifacts | default dict }}
{{- if eq ($artifacts.type | default "") "directory" }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ required "artifactsVolume.existingClaim is required for config.artifacts of type directory: a volume every API and worker pod mounts (ReadWriteMany)" .Values.artifactsVolume.existingClaim }}
{{- end }}
{{- end }}
