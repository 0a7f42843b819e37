{{/*
Names, labels and the pieces shared by several templates.

Names: every resource name starts with "vgg-trainer.base": the release name (plus the chart
name unless the release name contains it), made a valid DNS-1035 label (dots become dashes, a
leading digit gets the chart name in front) and cut to 40 characters (longer names keep 31
characters and a hash of the whole name, so two long releases never collide). 40 leaves room
for the Job's "-<runId>" and the pod hostname's "-<index>" within the 63-character DNS label
limit: the trainer's peers are "<job>-<index>.<service>".
*/}}

{{/*
The trainer's contract (trainer/contract.py): user and group, ports, paths, command, exit codes.
A test keeps these equal to the Python module; the templates use nothing else.
*/}}
{{- define "vgg-trainer.contract" -}}
uid: 10001
gid: 10001
containerName: trainer
command: trainer
configDir: /etc/trainer
configFile: config.yaml
scratchDir: /scratch
workerPort: 2222
workerPortName: worker
metricsPort: 9090
metricsPortName: metrics
healthPath: /healthz
exitPreempted: 76
exitNonRetriable: [64, 65]
leaseSeconds: 120
{{- end }}

{{/*
The metrics endpoint's port: trainer.monitoring.port (the trainer listens there), else the
contract's. The container port, the Service, the NetworkPolicy and the NOTES use it; the probe and
the monitors name the port ("metrics"), so they follow too. validate.yaml refuses ports no pod can use.
*/}}
{{- define "vgg-trainer.metricsPort" -}}
{{- $c := include "vgg-trainer.contract" . | fromYaml -}}
{{- dig "monitoring" "port" $c.metricsPort (.Values.trainer | default dict) | int -}}
{{- end }}

{{/* Pod labels the chart sets itself; podLabels may not repeat them (validate.yaml). */}}
{{- define "vgg-trainer.podLabels" -}}
{{ include "vgg-trainer.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/* Labels of this Job's pods only: the release's and the one the Job controller sets (NetworkPolicy peers). */}}
{{- define "vgg-trainer.peerLabels" -}}
{{ include "vgg-trainer.selectorLabels" . }}
batch.kubernetes.io/job-name: {{ include "vgg-trainer.jobName" . }}
{{- end }}

{{- define "vgg-trainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{- define "vgg-trainer.base" -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- $full = $full | lower | replace "." "-" | replace "_" "-" -}}
{{- if not (regexMatch "^[a-z]" $full) -}}
{{- $full = printf "%s-%s" $name $full -}}
{{- end -}}
{{- if gt (len $full) 40 -}}
{{- $full = printf "%s-%s" ($full | trunc 31 | trimSuffix "-") ($full | sha256sum | trunc 8) -}}
{{- end -}}
{{- $full -}}
{{- end }}

{{- define "vgg-trainer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels that select this release's pods (stable across runs and upgrades). */}}
{{- define "vgg-trainer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vgg-trainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vgg-trainer.labels" -}}
helm.sh/chart: {{ include "vgg-trainer.chart" . }}
{{ include "vgg-trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vgg-trainer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vgg-trainer.serviceName" -}}
{{- include "vgg-trainer.base" . -}}
{{- end }}

{{- define "vgg-trainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vgg-trainer.base" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{- define "vgg-trainer.image" -}}
{{- $repository := .Values.image.repository -}}
{{- with .Values.image.registry }}{{ $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}{{ end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end }}

{{/* Failed pods before the Job fails: job.backoffLimit, or 3 per worker. */}}
{{- define "vgg-trainer.backoffLimit" -}}
{{- if kindIs "invalid" .Values.job.backoffLimit -}}
{{- mul 3 (int .Values.workers) -}}
{{- else -}}
{{- int .Values.job.backoffLimit -}}
{{- end -}}
{{- end }}

{{/*
The trainer's configuration file: values.trainer with data.dataset and output.dir filled in from
the top-level `dataset` and `output` values (the other keys of trainer.data and trainer.output stay),
and output.lease_wait_seconds, unless set, from job.terminationGracePeriodSeconds + the lease's expiry.
The trainer validates it again at start (exit 64).
*/}}
{{- define "vgg-trainer.config" -}}
{{- $dataset := required "dataset is required: --set dataset=gs://BUCKET/PREFIX (the output of `trainer prepare`)" .Values.dataset -}}
{{- $output := required "output is required: --set output=gs://BUCKET/PREFIX (the run directory; the same output resumes a run)" .Values.output -}}
{{- $cfg := deepCopy (default dict .Values.trainer) -}}
{{- $data := deepCopy (default dict $cfg.data) -}}
{{- $_ := set $data "dataset" $dataset -}}
{{- $_ = set $cfg "data" $data -}}
{{- $out := deepCopy (default dict $cfg.output) -}}
{{- $_ = set $out "dir" $output -}}
{{- if not (hasKey $out "lease_wait_seconds") -}}
{{- /* The Job a `helm upgrade` starts waits for the old Job's pods (grace period) or their lease to expire. */ -}}
{{- $lease := default (include "vgg-trainer.contract" . | fromYaml).leaseSeconds $out.lease_seconds -}}
{{- $_ = set $out "lease_wait_seconds" (add (int .Values.job.terminationGracePeriodSeconds) (int $lease)) -}}
{{- end -}}
{{- $_ = set $cfg "output" $out -}}
{{- $staging := deepCopy (default dict $data.staging) -}}
{{- if and $staging.enabled (not $staging.dir) (not $staging.budget_gb) -}}
{{- /* Staging on the scratch emptyDir: the budget follows its size limit (the rest is for caches). */ -}}
{{- $budget := divf (floor (mulf (include "vgg-trainer.scratchBytes" .) 0.9e-7)) 100 -}}
{{- $_ = set $staging "budget_gb" $budget -}}
{{- $_ = set $data "staging" $staging -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* The worker pods' tolerations: the user's, and the GPU toleration unless the user already
tolerates that taint key (GKE's docs tell users to add it). */}}
{{- define "vgg-trainer.tolerations" -}}
{{- $v := .Values -}}
{{- $tolerations := $v.tolerations | default list -}}
{{- $userTolerates := false -}}
{{- range $tolerations -}}
{{- if eq (toString .key) $v.gpuResourceName }}{{ $userTolerates = true }}{{ end -}}
{{- end -}}
{{- if and (gt (int $v.gpusPerWorker) 0) $v.gpuToleration (not $userTolerates) -}}
{{- $tolerations = append $tolerations (dict "key" $v.gpuResourceName "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- toYaml $tolerations -}}
{{- end }}

{{/* scratch.sizeLimit in bytes (a Kubernetes quantity: plain, k/M/G/T or Ki/Mi/Gi/Ti). */}}
{{- define "vgg-trainer.scratchBytes" -}}
{{- $limit := .Values.scratch.sizeLimit | toString -}}
{{- $number := regexFind "^[0-9.]+" $limit | float64 -}}
{{- $unit := trimPrefix (regexFind "^[0-9.]+" $limit) $limit -}}
{{- $scale := get (dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0) $unit -}}
{{- printf "%.0f" (mulf $number $scale) -}}
{{- end }}

{{/*
The Job's name: "<base>-<runId>", runId defaulting to the first 8 hex digits of a hash of the Job
spec rendered with a placeholder name. A change to anything in the spec (workers, configuration,
image, resources, ...) gives a new name, so `helm upgrade` replaces the Job rather than failing on
its immutable pod template; an unchanged spec keeps the name (upgrade is a no-op for the Job).
`job.suspend` is left out of the hash so a run can be suspended and resumed in place.
*/}}
{{- define "vgg-trainer.jobName" -}}
{{- $base := include "vgg-trainer.base" . -}}
{{- if .Values.job.runId -}}
{{- printf "%s-%s" $base .Values.job.runId -}}
{{- else -}}
{{- $spec := include "vgg-trainer.jobSpec" (dict "root" . "jobName" "JOB-NAME" "hashing" true) -}}
{{- printf "%s-%s" $base ($spec | sha256sum | trunc 8) -}}
{{- end -}}
{{- end }}

{{- define "vgg-trainer.configMapName" -}}
{{- printf "%s-config" .jobName -}}
{{- end }}

{{/* Pod template annotations: the checksum makes any change of the configuration visible. */}}
{{- define "vgg-trainer.configChecksum" -}}
{{- include "vgg-trainer.config" . | sha256sum -}}
{{- end }}

{{/*
The Job spec. Arguments: root (the chart context), jobName, hashing (true while computing the
name: leaves out `suspend`).
*/}}
{{- define "vgg-trainer.jobSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $jobName := .jobName -}}
{{- $serviceName := include "vgg-trainer.serviceName" $root -}}
{{- $gpus := int $v.gpusPerWorker -}}
{{- $c := include "vgg-trainer.contract" $root | fromYaml -}}
{{- $configPath := printf "%s/%s" $c.configDir $c.configFile -}}
completionMode: Indexed
completions: {{ int $v.workers }}
parallelism: {{ int $v.workers }}
{{- /* Under Kueue no suspend at all: its webhook suspends the queued Job and Kueue flips the
field on admission; a rendered value would make Helm 4 (server-side apply) own it. */ -}}
{{- if not (or .hashing $v.kueue.enabled) }}
suspend: {{ $v.job.suspend }}
{{- end }}
backoffLimit: {{ include "vgg-trainer.backoffLimit" $root }}
{{- with $v.job.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ int . }}
{{- end }}
{{- if not (kindIs "invalid" $v.job.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ int $v.job.ttlSecondsAfterFinished }}
{{- end }}
# A replacement pod starts only after the failed one is gone: TF rejects two tasks of one index.
podReplacementPolicy: Failed
podFailurePolicy:
  rules:
    # Evictions, preemptions, node drains: not the trainer's fault; no retry budget spent.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
    # The trainer got SIGTERM, saved a backup and exited PREEMPTED: restart without spending budget.
    - action: Ignore
      onExitCodes:
        containerName: {{ $c.containerName }}
        operator: In
        values: [{{ $c.exitPreempted }}]
    # Bad configuration (64) or bad data (65): a retry cannot help; fail the Job at once.
    - action: FailJob
      onExitCodes:
        containerName: {{ $c.containerName }}
        operator: In
        values: {{ toJson $c.exitNonRetriable }}
    # Anything else (1 INTERNAL, 75 TRANSIENT, OOM kills, ...) counts toward backoffLimit.
template:
  metadata:
    labels:
      {{- include "vgg-trainer.podLabels" $root | nindent 6 }}
      {{- with $v.commonLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with $v.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    annotations:
      checksum/config: {{ include "vgg-trainer.configChecksum" $root }}
      {{- if $v.kueue.enabled }}
      {{- with $v.kueue.topology.required }}
      kueue.x-k8s.io/podset-required-topology: {{ . }}
      {{- end }}
      {{- with $v.kueue.topology.preferred }}
      kueue.x-k8s.io/podset-preferred-topology: {{ . }}
      {{- end }}
      {{- end }}
      {{- with $v.podAnnotations }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    restartPolicy: Never
    # Pods are "<job>-<index>.<service>": the trainer's TF_CONFIG peers.
    subdomain: {{ $serviceName }}
    serviceAccountName: {{ include "vgg-trainer.serviceAccountName" $root }}
    automountServiceAccountToken: false
    enableServiceLinks: false
    terminationGracePeriodSeconds: {{ int $v.job.terminationGracePeriodSeconds }}
    {{- with $v.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $v.schedulerName }}
    schedulerName: {{ . }}
    {{- end }}
    {{- with $v.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with (include "vgg-trainer.tolerations" $root | fromYamlArray) }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if $v.affinity }}
    affinity:
      {{- toYaml $v.affinity | nindent 6 }}
    {{- else if and (gt (int $v.workers) 1) (ne $v.workerPlacement "none") }}
    affinity:
      {{- if eq $v.workerPlacement "spread" }}
      podAntiAffinity:
      {{- else }}
      podAffinity:
      {{- end }}
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  {{- include "vgg-trainer.selectorLabels" $root | nindent 18 }}
                  batch.kubernetes.io/job-name: {{ $jobName }}
    {{- end }}
    securityContext:
      runAsNonRoot: true
      runAsUser: {{ $c.uid }}
      runAsGroup: {{ $c.gid }}
      fsGroup: {{ $c.gid }}
      fsGroupChangePolicy: OnRootMismatch
      seccompProfile:
        type: RuntimeDefault
    containers:
      - name: {{ $c.containerName }}
        image: {{ include "vgg-trainer.image" $root }}
        imagePullPolicy: {{ $v.image.pullPolicy }}
        command: [{{ $c.command }}]
        args: [train, --config, {{ $configPath }}]
        env:
          - name: TF_USE_LEGACY_KERAS
            value: "1"
          - name: TRAINER_CONFIG
            value: {{ $configPath }}
          - name: TRAINER_NUM_WORKERS
            value: {{ int $v.workers | quote }}
          - name: TRAINER_JOB_NAME
            value: {{ $jobName }}
          - name: TRAINER_SERVICE_NAME
            value: {{ $serviceName }}
          - name: TRAINER_NAMESPACE
            valueFrom:
              fieldRef:
                fieldPath: metadata.namespace
          - name: TRAINER_WORKER_PORT
            value: {{ $c.workerPort | quote }}
          - name: TRAINER_SCRATCH_DIR
            value: {{ $c.scratchDir }}
          # `trainer doctor` (kubectl exec) checks that TensorFlow sees them.
          - name: TRAINER_GPUS_PER_WORKER
            value: {{ $gpus | quote }}
          # Reported in the trainer_build_info metric.
          - name: TRAINER_IMAGE
            value: {{ include "vgg-trainer.image" $root | quote }}
          # Kubernetes sets it too on Indexed Jobs; the annotation works on every version.
          - name: JOB_COMPLETION_INDEX
            valueFrom:
              fieldRef:
                fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
          {{- if eq $gpus 0 }}
          # CPU only: hide any GPU a permissive node runtime would expose.
          - name: CUDA_VISIBLE_DEVICES
            value: ""
          {{- end }}
          {{- with $v.monitoring.pushgateway.existingSecret }}
          # The Pushgateway URL (it may carry credentials) from the Secret: never in the ConfigMap.
          - name: TRAINER_PUSHGATEWAY_URL
            valueFrom:
              secretKeyRef:
                name: {{ . }}
                key: {{ $v.monitoring.pushgateway.key }}
          {{- end }}
          {{- if $v.credentials.existingSecret }}
          # The path of the key file; the key itself stays in the mounted Secret.
          - name: GOOGLE_APPLICATION_CREDENTIALS
            value: {{ printf "%s/%s" $v.credentials.mountPath $v.credentials.key }}
          {{- end }}
          {{- with $v.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        ports:
          - name: {{ $c.workerPortName }}
            containerPort: {{ $c.workerPort }}
            protocol: TCP
          - name: {{ $c.metricsPortName }}
            containerPort: {{ include "vgg-trainer.metricsPort" $root }}
            protocol: TCP
        {{- $probe := $v.job.livenessProbe }}
        {{- if and $probe.enabled (ne (dig "monitoring" "enabled" true ($v.trainer | default dict)) false) }}
        # A frozen trainer (stopped, or stuck holding Python's GIL) stops answering: the kubelet
        # kills it, the pod fails and is replaced, and the group restarts from its backup.
        livenessProbe:
          httpGet:
            path: {{ $c.healthPath }}
            port: {{ $c.metricsPortName }}
          periodSeconds: {{ int $probe.periodSeconds }}
          timeoutSeconds: {{ int $probe.timeoutSeconds }}
          failureThreshold: {{ int $probe.failureThreshold }}
        {{- end }}
        resources:
          requests:
            {{- with $v.resources.requests }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- if gt $gpus 0 }}
            {{ $v.gpuResourceName }}: {{ $gpus }}
            {{- end }}
          limits:
            {{- with $v.resources.limits }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- if gt $gpus 0 }}
            {{ $v.gpuResourceName }}: {{ $gpus }}
            {{- end }}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
          runAsUser: {{ $c.uid }}
          runAsGroup: {{ $c.gid }}
          capabilities:
            drop: [ALL]
          seccompProfile:
            type: RuntimeDefault
        volumeMounts:
          - name: config
            mountPath: {{ $c.configDir }}
            readOnly: true
          - name: scratch
            mountPath: {{ $c.scratchDir }}
          - name: tmp
            mountPath: /tmp
          - name: dshm
            mountPath: /dev/shm
          {{- if $v.credentials.existingSecret }}
          - name: credentials
            mountPath: {{ $v.credentials.mountPath }}
            readOnly: true
          {{- end }}
          {{- with $v.extraVolumeMounts }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
    volumes:
      - name: config
        configMap:
          name: {{ include "vgg-trainer.configMapName" (dict "jobName" $jobName) }}
      - name: scratch
        emptyDir:
          {{- with $v.scratch.medium }}
          medium: {{ . }}
          {{- end }}
          sizeLimit: {{ $v.scratch.sizeLimit }}
      - name: tmp
        emptyDir:
          sizeLimit: {{ $v.tmp.sizeLimit }}
      - name: dshm
        emptyDir:
          medium: Memory
          sizeLimit: {{ $v.shm.sizeLimit }}
      {{- if $v.credentials.existingSecret }}
      - name: credentials
        secret:
          secretName: {{ $v.credentials.existingSecret }}
          defaultMode: 0440
          items:
            - key: {{ $v.credentials.key }}
              path: {{ $v.credentials.key }}
      {{- end }}
      {{- with $v.extraVolumes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}

{{/*
"true" when the Prometheus Operator's objects (PodMonitor, ServiceMonitor, PrometheusRule) are to
be rendered: the cluster serves monitoring.coreos.com/v1 (.Capabilities, which `helm install`
reads from the cluster and `helm template` takes from --api-versions), or monitoring.crds=always.
Without the CRDs the install would fail on "no matches for kind PodMonitor".
*/}}
{{- define "vgg-trainer.operatorCRDs" -}}
{{- or (eq .Values.monitoring.crds "always") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
{{- end }}
