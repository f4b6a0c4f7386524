{{/*
Named templates. The ones other charts use are "lessor.sidecar",
"lessor.volumes" and "lessor.configChecksum"; they read only:
  .Values   lessor's values (in a parent chart: .Values.lessor)
  .Release  the release (.Release.Name names the ConfigMap)
so a parent chart calls them with
  (dict "Values" .Values.lessor "Release" .Release)
*/}}

{{/* The chart's appVersion, for contexts without .Chart (kept equal to
Chart.yaml by the chart tests). */}}
{{- define "lessor.appVersion" -}}0.1.0{{- end -}}

{{- define "lessor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-lessor" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lessor.configName" -}}
{{- printf "%s-config" (include "lessor.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lessor.labels" -}}
app.kubernetes.io/name: lessor
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "lessor.appVersion" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
{{- end -}}

{{- define "lessor.selectorLabels" -}}
app.kubernetes.io/name: lessor
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lessor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "lessor.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The port of a "host:port" listen address, or the fallback. */}}
{{- define "lessor.portOf" -}}
{{- $listen := index . 0 -}}
{{- $fallback := index . 1 -}}
{{- if $listen -}}{{- regexFind "[0-9]+$" (toString $listen) -}}{{- else -}}{{- $fallback -}}{{- end -}}
{{- end -}}

{{/* Effective ports: config's listen addresses win over sidecar.ports. */}}
{{- define "lessor.grpcPort" -}}
{{- $grpc := (.Values.config | default dict).grpc | default dict -}}
{{- include "lessor.portOf" (list $grpc.listen .Values.sidecar.ports.grpc) -}}
{{- end -}}

{{- define "lessor.adminPort" -}}
{{- $admin := (.Values.config | default dict).admin | default dict -}}
{{- include "lessor.portOf" (list $admin.listen .Values.sidecar.ports.admin) -}}
{{- end -}}

{{/* lessor's configuration: .Values.config, with the listen addresses taken
from sidecar.ports unless config sets them. */}}
{{- define "lessor.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $grpc := deepCopy ($config.grpc | default dict) -}}
{{- if not $grpc.listen -}}
{{- $_ := set $grpc "listen" (printf "127.0.0.1:%v" .Values.sidecar.ports.grpc) -}}
{{- end -}}
{{- $_ := set $config "grpc" $grpc -}}
{{- $admin := deepCopy ($config.admin | default dict) -}}
{{- if not $admin.listen -}}
{{- $_ := set $admin "listen" (printf "0.0.0.0:%v" .Values.sidecar.ports.admin) -}}
{{- end -}}
{{- $_ := set $config "admin" $admin -}}
{{- $fleet := .Values.fleet | default dict -}}
{{- if and $fleet.enabled $fleet.budget -}}
{{- $block := dict "budget" (int $fleet.budget) "renew_interval" ($fleet.renewInterval | default "5s") "lease_duration" ($fleet.leaseDuration | default "15s") -}}
{{- if $fleet.group -}}{{- $_ := set $block "group" $fleet.group -}}{{- end -}}
{{- $found := false -}}
{{- range $i, $up := ($config.upstreams | default list) -}}
{{- if or (eq $up.name $fleet.upstream) (and (not $fleet.upstream) (eq $i 0)) -}}
{{- $_ := set $up "fleet" $block -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "fleet.upstream %q is not the name of any config.upstreams entry" $fleet.upstream) -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Whether lessor talks to the Kubernetes API (discovery or the fleet
budget): the service account token is mounted then. */}}
{{- define "lessor.needsApi" -}}
{{- or .Values.discovery.enabled (.Values.fleet | default dict).enabled -}}
{{- end -}}

{{/* For the pod template's annotations: a config change rolls the pods. */}}
{{- define "lessor.configChecksum" -}}
{{- include "lessor.config" . | sha256sum -}}
{{- end -}}

{{/* The lessor container, as one list item: under initContainers when
sidecar.native (with restartPolicy: Always), else under containers. */}}
{{- define "lessor.sidecar" -}}
- name: lessor
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default (include "lessor.appVersion" .) }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args: ["serve", "--config", "/etc/lessor/lessor.yaml"]
  ports:
    - name: grpc
      containerPort: {{ include "lessor.grpcPort" . | int }}
      protocol: TCP
    - name: admin
      containerPort: {{ include "lessor.adminPort" . | int }}
      protocol: TCP
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    {{- with .Values.otel }}
    {{- if .endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ .endpoint | quote }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: {{ .protocol | default "grpc" | quote }}
    - name: OTEL_SERVICE_NAME
      value: {{ .serviceName | default "lessor" | quote }}
    {{- end }}
    {{- end }}
    {{- with .Values.sidecar.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: lessor-config
      mountPath: /etc/lessor
      readOnly: true
    # The root is read-only; a heap profile (/debug/pprof/heap) is
    # written to a temporary file first.
    - name: lessor-tmp
      mountPath: /tmp
    {{- range $i, $m := .Values.sidecar.secretMounts }}
    - name: {{ printf "lessor-secret-%d" $i }}
      mountPath: {{ $m.mountPath | quote }}
      readOnly: true
    {{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.lifecycle }}
  lifecycle:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.probes }}
  startupProbe:
    {{- toYaml .startup | nindent 4 }}
  readinessProbe:
    {{- toYaml .readiness | nindent 4 }}
  livenessProbe:
    {{- toYaml .liveness | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
{{- end -}}

{{/* The volume the sidecar mounts, as one list item. */}}
{{- define "lessor.volumes" -}}
- name: lessor-config
  configMap:
    name: {{ include "lessor.configName" . }}
- name: lessor-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- range $i, $m := .Values.sidecar.secretMounts }}
- name: {{ printf "lessor-secret-%d" $i }}
  secret:
    secretName: {{ $m.secretName | quote }}
    defaultMode: {{ $m.defaultMode | default 288 }}
    {{- with $m.items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- with .Values.sidecar.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
