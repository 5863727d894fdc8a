{{/* Names and labels shared by every object of the release. */}}

{{- define "agentgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentgate.labels" -}}
{{ include "agentgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "agentgate.tokensSecret" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "agentgate.fullname" .)) -}}
{{- end -}}

{{/* The agent port speaks TLS itself when a certificate is mounted. */}}
{{- define "agentgate.agentTls" -}}
{{- if .Values.tls.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "agentgate.redisName" -}}
{{- printf "%s-redis" (include "agentgate.fullname" .) -}}
{{- end -}}
