{{/* AGENTGATE_AGENT_UPSTREAM: `default` as a bare URL, the others as NAME=URL, comma-separated. */}}
{{- define "agentgate-agent.upstreams" -}}
{{- $parts := list -}}
{{- range $name, $url := .Values.upstreams -}}
{{- if eq $name "default" -}}
{{- $parts = append $parts $url -}}
{{- else -}}
{{- $parts = append $parts (printf "%s=%s" $name $url) -}}
{{- end -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}
