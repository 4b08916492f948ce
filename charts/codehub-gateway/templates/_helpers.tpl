{{/* Names, labels and the gateway settings file. */}}

{{- define "codehub-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codehub-gateway.fullname" -}}
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

{{- define "codehub-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codehub-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "codehub-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "codehub-gateway.labels" -}}
helm.sh/chart: {{ include "codehub-gateway.chart" . }}
{{ include "codehub-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: codehub
{{- end }}

{{- define "codehub-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "codehub-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Where workspaces (pods, PVCs, snapshots, Workspace objects, share links, tokens, the Lease) live: never the
release namespace, where whoever creates pods could mount the gateway's signing keys.
*/}}
{{- define "codehub-gateway.workspaceNamespace" -}}
{{- $namespace := default (printf "%s-workspaces" .Release.Namespace | trunc 63 | trimSuffix "-") .Values.workspaces.namespace }}
{{- if eq $namespace .Release.Namespace }}
{{- fail (printf "workspaces.namespace must not be the release namespace %q: whoever may create pods there may mount the gateway's signing keys. Leave it empty (%s-workspaces) or name another namespace (README.md, \"Upgrading from 0.1\")" .Release.Namespace .Release.Namespace) }}
{{- end }}
{{- $namespace }}
{{- end }}

{{/* The gateway image: by digest when one is given (the tag is then only a label for people). */}}
{{- define "codehub-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "codehub-gateway.hubUrl" -}}
{{- default (printf "https://%s" .Values.ingress.hub.host) .Values.gateway.hubUrl }}
{{- end }}

{{- define "codehub-gateway.previewDomain" -}}
{{- default .Values.ingress.preview.domain .Values.gateway.previewDomain }}
{{- end }}

{{/* The signing keys Secret: required, because replicas must share one set of keys and Helm cannot make Ed25519 keys. */}}
{{- define "codehub-gateway.signingKeysSecret" -}}
{{- required "auth.signingKeys.existingSecret is required: create the signing keys Secret first, e.g. `CODEHUB_AUTH__KEYS_FILE=signing-keys.json codehub-gateway keys rotate && head -c 48 /dev/urandom | base64 > ide-key && kubectl -n <namespace> create secret generic codehub-signing-keys --from-file=signing-keys.json --from-file=ide-key`, then --set auth.signingKeys.existingSecret=codehub-signing-keys (see the chart's README.md)" .Values.auth.signingKeys.existingSecret }}
{{- end }}

{{/* The OIDC client secret: an existing Secret, or the one this chart creates from auth.oidc.clientSecret. */}}
{{- define "codehub-gateway.oidcSecret" -}}
{{- if .Values.auth.oidc.existingSecret }}
{{- .Values.auth.oidc.existingSecret }}
{{- else if .Values.auth.oidc.clientSecret }}
{{- printf "%s-oidc" (include "codehub-gateway.fullname" .) }}
{{- else }}
{{- fail "the OIDC client secret is required: set auth.oidc.existingSecret to a Secret holding it under auth.oidc.secretKey (e.g. `kubectl -n <namespace> create secret generic codehub-oidc --from-literal=client-secret=...`), or auth.oidc.clientSecret" }}
{{- end }}
{{- end }}

{{/*
The gateway settings file (gateway.yaml) as a dict: one place, one section per concern, then
gateway.extraConfig deep-merged over it. Settings are gateway/config.py's names.
*/}}
{{- define "codehub-gateway.config" -}}
{{- $oidc := dict
  "issuer" (required "auth.oidc.issuer is required: the IdP's issuer URL, like https://sso.example.com/realms/main" .Values.auth.oidc.issuer)
  "client_id" (required "auth.oidc.clientId is required" .Values.auth.oidc.clientId)
  "client_secret_file" (printf "/etc/codehub/oidc/%s" .Values.auth.oidc.secretKey)
  "scopes" .Values.auth.oidc.scopes
  "username_claim" .Values.auth.oidc.usernameClaim
  "groups_claim" .Values.auth.oidc.groupsClaim
  "sign_out_at_idp" .Values.auth.oidc.signOutAtIdp }}
{{- $auth := dict
  "mode" "oidc"
  "oidc" $oidc
  "session_ttl" .Values.auth.sessionTtl
  "keys_file" (printf "/etc/codehub/keys/%s" .Values.auth.signingKeys.key)
  "store_file" "/var/lib/codehub/tokens.json" }}
{{- $ws := .Values.workspaces }}
{{- $kubernetes := dict
  "in_cluster" true
  "namespace" (include "codehub-gateway.workspaceNamespace" .)
  "image" $ws.image
  "ide_port" $ws.idePort
  "storage_size" $ws.storageSize
  "resources" (dict "requests" $ws.resources.requests "limits" $ws.resources.limits)
  "lease_name" .Values.leaderElection.leaseName
  "lease_duration" .Values.leaderElection.leaseDuration }}
{{- $_ := set $kubernetes "ide_key_file" (printf "/etc/codehub/ide/%s" .Values.auth.ideKey.key) }}
{{- with $ws.storageClass }}{{ $_ := set $kubernetes "storage_class" . }}{{ end }}
{{- with $ws.snapshotClass }}{{ $_ := set $kubernetes "snapshot_class" . }}{{ end }}
{{- $config := dict
  "listen" (dict "host" "0.0.0.0" "port" 8080)
  "metrics" (dict "host" "0.0.0.0" "port" .Values.metricsPort)
  "hub_url" (include "codehub-gateway.hubUrl" .)
  "preview_domain" (include "codehub-gateway.previewDomain" .)
  "trusted_proxies" .Values.gateway.trustedProxies
  "policy_file" (printf "/etc/codehub/policies/%s" .Values.gateway.policyFile)
  "auth" $auth
  "runtime" "kubernetes"
  "kubernetes" $kubernetes
  "local" (dict "state_dir" "/var/lib/codehub") }}
{{- $merged := mustMergeOverwrite $config (deepCopy .Values.gateway.extraConfig) }}
{{- toYaml $merged }}
{{- end }}
