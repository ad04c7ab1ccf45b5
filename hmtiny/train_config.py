"""The training configuration: SimpleTuner's config.json keys, checked before any model is loaded.

`load_config(path, overrides)` reads a JSON file (SimpleTuner writes keys with or without a leading `--`), applies
`--key=value` command-line overrides, maps SimpleTuner's aliases to our names, warns once about SimpleTuner options
that mean nothing here, and rejects typos (suggesting the closest key), wrong types and impossible values, naming
the key. JSON `null` means "use the default", as in SimpleTuner.

Relative paths resolve against the current directory, like SimpleTuner; when such a path does not exist there but
does exist beside the config file, that one is used (so a config folder can carry its data, and the built-in tiny
default runs from any directory). output_dir is relative to the current directory.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN_CONFIG = PACKAGE_DIR / "assets" / "tiny" / "config.json"

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("bf16", "fp16", "no")
INT8_BASES = ("int8-quanto", "int8", "int8-torchao")
DENSE_BASES = ("no_change", "bf16")
DYNAMO_BACKENDS = ("no", "inductor", "aot_eager", "eager")  # the last two: torch.compile's debugging backends
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg", "opus")
# scheduled_sampling_sampler: how rollout frames are drawn; SimpleTuner's diffusion solver names map to "topk"
SAMPLERS = ("topk", "greedy")
DIFFUSION_SOLVERS = ("unipc", "euler", "heun", "dpm", "dpm++", "rk4", "ddim")
ADAMW_NAMES = ("adamw", "adamw_bf16", "adamw_torch", "adamw_torch_fused", "adamw_schedulefree", "optimi-adamw")


class ConfigError(ValueError):
    """A problem with the user's configuration (reported without a traceback)."""


@dataclass
class TrainConfig:
    # ---- model
    model_family: str = "heartmula"
    model_type: str = "lora"  # lora | full (every weight trains: hmtiny/full_finetune.py)
    model_flavour: str = "3b"
    pretrained_model_name_or_path: str = "HeartMuLa/HeartMuLa-oss-3B"  # repo id, model folder or heartlib ckpt/
    tokenizer_path: str | None = None  # tokenizer.json (gen_config.json beside it) or folder; None: near the model
    gen_config_path: str | None = None  # HeartMuLaGen gen_config.json when not beside tokenizer.json
    codec_path: str | None = None  # HeartCodec folder/repo; None: <ckpt>/HeartCodec-oss, else HeartMuLa/HeartCodec-oss
    mixed_precision: str = "bf16"  # bf16 | fp16 | no (autocast dtype; bf16/fp16 also store the frozen base in it)
    base_model_precision: str = "no_change"  # no_change | bf16 | int8-quanto | int8 | int8-torchao
    device: str = "auto"  # auto = cuda if available, else mps, else cpu
    # ---- data
    data_backend_config: str | None = None
    output_dir: str = "output/heartmula-lora"
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # ---- optimisation
    optimizer: str = "adamw_bf16"  # every AdamW flavour maps to torch AdamW over float32 LoRA weights
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_train_steps: int = 0  # > 0: stop there (wins over epochs)
    num_train_epochs: int = 1  # used when max_train_steps is 0; 0 means "use max_train_steps"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 2.0  # 0 = no clipping
    gradient_checkpointing: bool = True
    seed: int | None = None  # None: a random seed, printed so the run can be repeated
    decoder_fraction: float = 1.0  # < 1: depth decoder on that share of frames (CSM's amortisation, docs/model.md)
    dynamo_backend: str = "no"  # "inductor": torch.compile each transformer block (SimpleTuner's option name)
    dynamo_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    cuda_graphs: bool = True  # CUDA: replay the step's forward+backward as captured graphs (hmtiny/captured_step.py)
    # ---- LoRA
    lora_type: str = "standard"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None = lora_rank
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None  # None: q/k/v/output_proj + w1/w2/w3 in backbone and decoder
    init_lora: str | None = None
    # ---- checkpoints
    checkpointing_steps: int = 500  # 0 = only the final LoRA
    checkpoints_total_limit: int | None = 5
    resume_from_checkpoint: str | None = "latest"  # "latest" (if any), a checkpoint folder/name, or null
    resume_anyway: bool = False  # resume even when the checkpoint was saved with other settings (listed in the error)
    # ---- validation
    validation_prompt: str | None = None  # tags; None disables validation
    validation_lyrics: str = ""
    validation_audio_duration: float = 30.0
    validation_guidance: float = 1.5
    validation_step_interval: int = 100  # 0 = only at the end
    num_validation_images: int = 1  # number of clips
    validation_seed: int | None = None  # None: the run's seed
    validation_disable: bool = False
    validation_on_startup: bool = False
    validation_temperature: float = 1.0
    validation_topk: int = 50  # 0 = no top-k, 1 = greedy
    validation_codec_steps: int = 10
    validation_codec_guidance: float = 1.25
    validation_codec_dtype: str | None = None  # fp32 | tf32 | bf16; None: bf16 on CUDA, fp32 elsewhere
    validation_audio_format: str = "wav"  # wav | flac | mp3 | ogg | opus
    # ---- trackers (hmtiny.trackers)
    report_to: str = "none"  # none | tensorboard | wandb | all
    logging_dir: str = "logs"  # TensorBoard's folder, under output_dir
    tracker_project_name: str | None = None  # W&B project (None: "hmtiny")
    tracker_run_name: str | None = None
    # ---- training objective (hmtiny/objective.py)
    caption_dropout_probability: float = 0.0  # per sample: train on the unconditional prompt (CFG's other branch)
    scheduled_sampling_max_step_offset: int = 0  # K rollout passes without gradient; 0 = off
    scheduled_sampling_probability: float = 0.0  # per audio frame: chance its input is the model's own frame
    scheduled_sampling_ramp_steps: int = 0  # > 0: p goes prob_start -> prob_end over these steps (then stays)
    scheduled_sampling_prob_start: float = 0.0
    scheduled_sampling_prob_end: float = 0.5
    scheduled_sampling_start_step: int = 0  # p is 0 before this optimizer step
    scheduled_sampling_ramp_shape: str = "linear"  # linear | cosine
    scheduled_sampling_sampler: str = "topk"  # topk (validation_topk / validation_temperature) | greedy
    # ---- accepted for SimpleTuner compatibility
    resolution: float | None = None  # ignored: audio has no resolution

    # set by load_config, not config keys
    config_path: str | None = field(default=None, metadata={"internal": True})

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def validation_cfg_scale(self) -> float:
        """validation_guidance as the sampler's scale: below 1 (SimpleTuner allows 0) means no guidance."""
        return max(1.0, self.validation_guidance)

    @property
    def int8_base(self) -> bool:
        return self.base_model_precision in INT8_BASES

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("internal")}


# SimpleTuner names for things we do.
ALIASES = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_steps": "validation_step_interval",
    "peft_lora_target_modules": "lora_target_modules",
    "pretrained_transformer_model_name_or_path": "pretrained_model_name_or_path",
}

# SimpleTuner options only meaningful for images: a clear note instead of a silent drop.
IMAGE_ONLY = {
    "validation_resolution", "validation_negative_prompt", "validation_guidance_rescale", "validation_image_format",
    "validation_image_quality", "evaluation_type", "num_eval_images", "validation_num_video_frames",
    "maximum_image_size", "minimum_image_size", "resolution_type", "target_downsample_size",
    "validation_guidance_skip_layers", "validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop",
    "validation_guidance_skip_scale", "tracker_image_layout", "aspect_bucket_alignment", "aspect_bucket_rounding",
}

# Every option SimpleTuner knows (its field registry and argument parser, as of 2026). Keys from this list that
# are neither ours nor aliases are accepted and listed in one warning; anything else is a typo.
SIMPLETUNER_OPTIONS = set("""
__active_tab__ __disabled_fields__ accelerate_config accelerate_extra_args accelerator_cache_clear_interval
adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_dataset_oversubscription allow_tf32
aspect_bucket_alignment aspect_bucket_disable_rebuild aspect_bucket_rounding aspect_bucket_worker_count
aspect_ratio_bucket_max aspect_ratio_bucket_min assistant_lora_inference_strength assistant_lora_path
assistant_lora_strength attention_mechanism audio_channels audio_duration_interval audio_flow_schedule_shift
audio_max_duration_seconds audio_min_duration_seconds audio_truncation_mode aws_max_pool_connections
base_model_default_dtype base_model_precision cache_dir cache_dir_text cache_dir_vae caption_dropout_probability
caption_strategy checkpoint_epoch_interval checkpoint_step_interval checkpointing_rolling_steps
checkpointing_steps checkpointing_use_tempdir checkpoints_rolling_total_limit checkpoints_total_limit
compress_disk_cache conditioning_multidataset_sampling configs_dir context_parallel_comm_strategy
context_parallel_size control controlnet controlnet_custom_config controlnet_model_name_or_path
crepa_adjacent_distance crepa_adjacent_tau crepa_block_index crepa_cutoff_step crepa_decay_steps
crepa_drop_vae_encoder crepa_enabled crepa_encoder crepa_encoder_frames_batch_size crepa_encoder_image_size
crepa_feature_source crepa_lambda crepa_lambda_end crepa_normalize_by_frames crepa_normalize_neighbour_sum
crepa_power crepa_scheduler crepa_self_flow crepa_self_flow_mask_ratio crepa_similarity_ema_decay
crepa_similarity_threshold crepa_spatial_align crepa_teacher_block_index crepa_threshold_mode
crepa_use_backbone_features crepa_use_tae crepa_warmup_steps custom_tracker data_aesthetic_score
data_backend_config data_backend_sampling dataloader_prefetch dataloader_prefetch_qlen debug_aspect_buckets
debug_dataset_loader deepfloyd_validation_pipeline_mode deepfloyd_validation_stage1_guidance
deepfloyd_validation_stage1_model deepfloyd_validation_stage1_num_inference_steps
deepfloyd_validation_stage2_guidance deepfloyd_validation_stage2_model
deepfloyd_validation_stage2_num_inference_steps deepfloyd_validation_stage3_guidance
deepfloyd_validation_stage3_mode deepfloyd_validation_stage3_model deepfloyd_validation_stage3_noise_level
deepspeed_config delete_invalid_checkpoints delete_model_after_load delete_nsfw_images delete_problematic_images
delete_unwanted_images diff2flow_enabled diff2flow_loss diffusion_blocks_config disable_assistant_lora
disable_benchmark disable_bucket_pruning disable_multiline_split disable_segmented_timestep_sampling
disable_tf32 disk_low_action disk_low_script disk_low_threshold distillation_config distillation_method
dynamo_backend dynamo_dynamic dynamo_fullgraph dynamo_mode dynamo_use_regional_compilation ema_cpu_only
ema_decay ema_device ema_foreach_disable ema_update_interval ema_validation ema_warmup_steps
enable_chunked_feed_forward enable_group_offload enable_multiprocessing enable_nsfw_check enable_watermark
enable_xformers_memory_efficient_attention eval_dataset_id eval_dataset_pooling eval_epoch_interval
eval_loss_disable eval_steps_interval eval_timesteps evaluation_type ez_model_type feed_forward_chunk_size
find_unused_parameters flow_beta_schedule_alpha flow_beta_schedule_beta flow_cubic_schedule_weights
flow_custom_timesteps flow_schedule_auto_shift flow_schedule_shift flow_sigmoid_scale flow_timesteps_mode
flow_use_beta_schedule flow_use_uniform_schedule flux_fast_schedule flux_guidance_value flux_lora_target
framerate freeze_encoder_after freeze_encoder_before freeze_encoder_strategy fsdp_activation_checkpointing
fsdp_auto_wrap_policy fsdp_cpu_offload fsdp_cpu_ram_efficient_loading fsdp_enable fsdp_limit_all_gathers
fsdp_reshard_after_forward fsdp_state_dict_type fsdp_transformer_layer_cls_to_wrap fsdp_version
fully_unload_text_encoder fuse_optimizer grad_clip_method gradient_accumulation_steps gradient_checkpointing
gradient_checkpointing_backend gradient_checkpointing_interval gradient_checkpointing_offload_attention
gradient_checkpointing_offload_pin_memory_max_buckets gradient_checkpointing_offload_prefetch
gradient_checkpointing_segment_stride gradient_precision group_offload_blocks_per_group
group_offload_text_encoder group_offload_to_disk_path group_offload_type group_offload_use_stream
group_offload_vae hub_model_id huber_c huber_schedule i_know_what_i_am_doing ignore_final_epochs
ignore_missing_files image_processing_batch_size inference_scheduler_timestep_spacing init_lokr_norm init_lora
init_lora_ema init_lora_step input_perturbation input_perturbation_steps instance_prompt
internal_guidance_block_index internal_guidance_enabled internal_guidance_loss_weight irepa_enabled
irepa_projector_kernel_size irepa_spatial_norm_alpha keep_vae_loaded layer_freeze_strategy layersync_enabled
layersync_lambda layersync_student_block layersync_teacher_block learning_rate local_rank logging_dir lora_alpha
lora_dropout lora_format lora_init_type lora_rank lora_type loss_type lr_end lr_num_cycles lr_power lr_scale
lr_scale_sqrt lr_scheduler lr_warmup_steps ltx2_validation_audio_guidance ltx2_validation_pipeline_mode
ltx2_validation_spatial_upsampler_filename ltx2_validation_spatial_upsampler_model lycoris_config machine_rank
main_process_ip main_process_port masked_loss_probability max_grad_norm max_grounding_entities max_train_steps
max_upscale_threshold max_workers maximum_image_size merge_environment_config metadata_update_interval
minimum_image_size mixed_precision mixflow_enabled mixflow_gamma model_card_note model_card_private
model_card_safe_for_work model_family model_flavour model_type modelspec_comment musubi_block_swap_device
musubi_blocks_to_swap nextlat_block_index nextlat_enabled nextlat_kl_weight nextlat_state_loss nextlat_weight
noise_offset noise_offset_probability nsfw_check_backend_types nsfw_check_min_votes nsfw_check_models
nsfw_check_sample_types nsfw_check_video_frame_count nsfw_check_video_frame_selection
nsfw_check_video_min_flagged_frames num_eval_images num_machines num_processes num_train_epochs
num_validation_images offload_during_save offload_during_startup offload_param_path offset_noise
only_instance_prompt optimizer optimizer_beta1 optimizer_beta2 optimizer_config optimizer_cpu_offload_method
optimizer_offload_gradients optimizer_release_gradients output_dir override_dataset_config
parquet_caption_column parquet_filename_column peft_lora_mode peft_lora_target_modules
pixart_validation_pipeline_mode pixart_validation_stage1_model pixart_validation_stage2_model
post_checkpoint_script post_upload_script prediction_type prepend_instance_prompt preserve_data_backend_cache
pretrained_evaluation_model_name_or_path pretrained_gemma_model_name_or_path
pretrained_grounding_model_name_or_path pretrained_model_name_or_path pretrained_t5_model_name_or_path
pretrained_transformer_model_name_or_path pretrained_transformer_subfolder pretrained_unet_model_name_or_path
pretrained_unet_subfolder pretrained_vae_model_name_or_path print_filenames print_sampler_statistics
prodigy_steps publishing_config push_checkpoints_to_hub push_to_hub push_to_hub_background quantization_config
quantize_activations quantize_via qwen_text_encoder_model_name_or_path ramtorch ramtorch_controlnet
ramtorch_disable_extensions ramtorch_disable_sync_hooks ramtorch_target_modules ramtorch_text_encoder
ramtorch_text_encoder_percent ramtorch_transformer_percent ramtorch_vae read_batch_size refiner_training
refiner_training_invert_schedule refiner_training_strength repeats report_to rescale_betas_zero_snr resolution
resolution_type resume_from_checkpoint revision sageattention_usage same_network save_text_encoder
scheduled_sampling_max_step_offset scheduled_sampling_order scheduled_sampling_prob_end
scheduled_sampling_prob_start scheduled_sampling_probability scheduled_sampling_ramp_shape
scheduled_sampling_ramp_steps scheduled_sampling_reflexflow scheduled_sampling_reflexflow_alpha
scheduled_sampling_reflexflow_beta1 scheduled_sampling_reflexflow_beta2 scheduled_sampling_sampler
scheduled_sampling_start_step scheduled_sampling_strategy sdnq_compile_mode sdnq_dequantize_fp32 sdnq_group_size
sdnq_hadamard_group_size sdnq_modules_dtype_dict sdnq_modules_quant_config sdnq_modules_to_not_convert
sdnq_modules_to_not_use_matmul sdnq_quantized_matmul_dtype sdnq_svd_rank sdnq_svd_steps sdnq_use_hadamard
sdnq_use_quantized_matmul sdnq_use_static_quantization sdnq_use_stochastic_rounding sdnq_use_svd
sdnq_weights_dtype sdxl_validation_pipeline_mode sdxl_validation_stage1_model sdxl_validation_stage2_model seed
seed_for_each_device set_grads_to_none singlora_ramp_up_steps skip_file_discovery sla_config slider_lora_target
snr_gamma snr_weight soft_min_snr_sigma_data strict_epoch_limit t5_padding target_downsample_size
text_cache_disable text_cache_ondemand text_embed_full_cache text_encoder_batch_size text_encoder_limit
text_encoder_lr timestep_bias_begin timestep_bias_end timestep_bias_multiplier timestep_bias_portion
timestep_bias_strategy tokenizer_max_length torch_num_threads tracker_image_layout tracker_project_name
tracker_run_name train_batch_size train_text_encoder training_scheduler_timestep_spacing tread_config
trust_remote_code twinflow_enabled twinflow_target_step_count unet_attention_slice urepa_cutoff_step
urepa_decay_steps urepa_enabled urepa_encoder_image_size urepa_lambda urepa_lambda_end urepa_manifold_weight
urepa_model urepa_power urepa_scheduler urepa_similarity_ema_decay urepa_similarity_threshold
urepa_threshold_mode urepa_use_tae urepa_warmup_steps use_dora use_ema use_soft_min_snr user_prompt_library
vae_batch_size vae_cache_disable vae_cache_ondemand vae_cache_scan_behaviour vae_dtype vae_enable_patch_conv
vae_enable_slicing vae_enable_temporal_roll vae_enable_tiling validate_after_epoch validate_after_step
validation_adapter_config validation_adapter_mode validation_adapter_name validation_adapter_path
validation_adapter_strength validation_disable validation_disable_unconditional validation_epoch_interval
validation_external_background validation_external_script validation_guidance validation_guidance_real
validation_guidance_rescale validation_guidance_skip_layers validation_guidance_skip_layers_start
validation_guidance_skip_layers_stop validation_guidance_skip_scale validation_image_format
validation_image_quality validation_input validation_internal_guidance_scale validation_lycoris_strength
validation_method validation_multigpu validation_negative_prompt validation_no_cfg_until_timestep
validation_noise_scheduler validation_num_inference_steps validation_num_video_frames validation_on_startup
validation_preview validation_preview_steps validation_prompt validation_prompt_library validation_randomize
validation_resolution validation_seed validation_seed_source validation_step_interval validation_steps
validation_stitch_input_location validation_using_datasets variant wan_validation_load_other_stage
webhook_config webhook_reporting_interval write_batch_size xm_block_size xm_candidate_count xm_enabled
xm_selection_scope xm_training_target
""".split())


# ---------------------------------------------------------------- type coercion
def _type_hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp):
    """(python type, optional?) for int | None, list[str] | None, ..."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    return tp, optional


def coerce(key: str, value, tp):
    """Check/convert one value to the field's type. Strings (from the command line, or quoted in JSON, as
    SimpleTuner allows) are parsed."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, "a list of names")
    bad = ConfigError(f"{key} must be {want}, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if base is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return out
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    # list[str]
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise bad from None
        else:
            value = [v.strip() for v in s.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad


# ---------------------------------------------------------------- reading
def _canonical(key: str) -> str:
    return key.lstrip("-").strip()


def _suggest(key: str) -> str:
    ours = [f.name for f in fields(TrainConfig) if not f.metadata.get("internal")]
    close = difflib.get_close_matches(key, ours + list(ALIASES), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key, sorted(SIMPLETUNER_OPTIONS), n=1, cutoff=0.75)
    return f": did you mean {close[0]!r}?" if close else ""


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """`[config.json | env=NAME] [--key=value | --key value | --flag ...]` -> (config path or None, overrides)."""
    path, overrides, i = None, {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"  # a bare --flag
            if not key:
                raise ConfigError(f"malformed argument {a!r}: use --key=value")
            overrides[key] = value
        elif path is None:
            # SimpleTuner's `env=NAME` means config/NAME/config.json
            path = str(Path("config") / a[4:] / "config.json") if a.startswith("env=") else a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one config file, then --key=value overrides")
        i += 1
    return path, overrides


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (offset {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of key: value pairs")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, warn=None) -> TrainConfig:
    """Read, merge and check a configuration. path None = the built-in tiny default."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    path = Path(path) if path is not None else BUILTIN_CONFIG
    raw = [(k, v, str(path)) for k, v in _read_json(path).items()]
    raw += [(k, v, "command line") for k, v in (overrides or {}).items()]

    hints = _type_hints()
    ours = {f.name for f in fields(TrainConfig) if not f.metadata.get("internal")}
    values, origin, ignored, image_only = {}, {}, [], []
    for key, value, where in raw:
        key = _canonical(key)
        name = ALIASES.get(key, key)
        if name in ours:
            if value is None:  # SimpleTuner: null = default
                continue
            if name in origin and origin[name][0] != key and origin[name][1] == where:
                raise ConfigError(f"{where} sets both {origin[name][0]!r} and {key!r} (the same option)")
            values[name] = coerce(key, value, hints[name])
            origin[name] = (key, where)
        elif key in IMAGE_ONLY:
            image_only.append(key)
        elif key in SIMPLETUNER_OPTIONS:
            ignored.append(key)
        else:
            raise ConfigError(f"unknown config key {key!r} ({where}){_suggest(key)}")
    if ignored:
        warn(f"ignoring SimpleTuner option(s) that do nothing for HeartMuLa here: {', '.join(sorted(set(ignored)))}")
    if image_only:
        warn(f"ignoring image-only option(s): {', '.join(sorted(set(image_only)))} (HeartMuLa makes audio; "
             f"num_validation_images is the number of validation clips)")
    cfg = TrainConfig(**values)
    cfg.config_path = str(path)
    if cfg.model_type == "full":
        unused = sorted(k for k in origin if k.startswith("lora_"))
        if unused:
            warn(f"model_type 'full' trains every weight, no LoRA: ignoring {', '.join(unused)}")
        if cfg.base_model_precision == "bf16":
            warn("model_type 'full' keeps float32 master weights: base_model_precision 'bf16' is ignored "
                 "(mixed_precision sets the compute dtype)")
    if cfg.scheduled_sampling_sampler.lower() in DIFFUSION_SOLVERS:
        warn(f"scheduled_sampling_sampler {cfg.scheduled_sampling_sampler!r} is a diffusion solver; HeartMuLa is "
             f"autoregressive: its rollout frames are drawn like validation's (top-k {cfg.validation_topk}, "
             f"temperature {cfg.validation_temperature:g}), i.e. 'topk'; 'greedy' takes the most likely ids")
        cfg.scheduled_sampling_sampler = "topk"
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- checking
def _choice(cfg, key, allowed, hint=""):
    v = getattr(cfg, key)
    if v not in allowed:
        raise ConfigError(f"{key} {v!r} is not supported{hint}: choose one of {list(allowed)}")


def validate(cfg: TrainConfig):
    """Impossible values and unsupported modes, before anything heavy happens."""
    if str(cfg.model_family).lower() != "heartmula":
        raise ConfigError(f"model_family {cfg.model_family!r} is not supported: this trainer is for 'heartmula' only")
    _choice(cfg, "model_type", ("lora", "full"))
    if cfg.model_type == "full" and cfg.int8_base:
        raise ConfigError(f"base_model_precision {cfg.base_model_precision!r} cannot go with model_type 'full': "
                          f"full fine-tuning updates every weight in float32, an int8 base is frozen; use "
                          f"base_model_precision 'no_change', or model_type 'lora'")
    if cfg.model_type == "full" and cfg.init_lora:
        raise ConfigError("init_lora cannot go with model_type 'full' (it trains the whole model, no LoRA): merge "
                          "the LoRA first (python -m hmtiny.export --model BASE --lora LORA --merge --out DIR) and "
                          "set pretrained_model_name_or_path to DIR")
    if str(cfg.model_flavour).lower() not in ("3b",):
        raise ConfigError(f"model_flavour {cfg.model_flavour!r} is not supported: HeartMuLa has flavour '3b'")
    _choice(cfg, "mixed_precision", MIXED_PRECISION)
    _choice(cfg, "base_model_precision", DENSE_BASES + INT8_BASES)
    _choice(cfg, "lr_scheduler", SCHEDULERS)
    _choice(cfg, "dynamo_backend", DYNAMO_BACKENDS)
    _choice(cfg, "lora_type", ("standard",), " (LyCORIS is not implemented)")
    _choice(cfg, "validation_audio_format", AUDIO_FORMATS)
    if cfg.validation_codec_dtype is not None:
        from .codec.precision import CODEC_DTYPES
        _choice(cfg, "validation_codec_dtype", CODEC_DTYPES)
    if cfg.validation_audio_format not in ("wav", "flac"):
        from .codec.audio import check_audio_format
        try:
            check_audio_format(f"validation.{cfg.validation_audio_format}")
        except ImportError:
            pass  # no soundfile: validation keeps the tokens and says so
        except ValueError as e:
            raise ConfigError(f"validation_audio_format {cfg.validation_audio_format!r}: {e}") from None
    if cfg.optimizer not in ADAMW_NAMES:
        raise ConfigError(f"optimizer {cfg.optimizer!r} is not supported: AdamW only ({list(ADAMW_NAMES)})")
    positive = {"learning_rate": cfg.learning_rate, "lora_rank": cfg.lora_rank,
                "train_batch_size": cfg.train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "validation_audio_duration": cfg.validation_audio_duration,
                "num_validation_images": cfg.num_validation_images, "adam_epsilon": cfg.adam_epsilon,
                "validation_codec_steps": cfg.validation_codec_steps}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be > 0, got {v}")
    from .runtime import check_sampling
    try:
        check_sampling(cfg.validation_topk, cfg.validation_temperature,
                       names=("validation_topk", "validation_temperature", "validation_guidance"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    non_negative = {"lr_warmup_steps": cfg.lr_warmup_steps, "max_train_steps": cfg.max_train_steps,
                    "num_train_epochs": cfg.num_train_epochs, "max_grad_norm": cfg.max_grad_norm,
                    "adam_weight_decay": cfg.adam_weight_decay, "checkpointing_steps": cfg.checkpointing_steps,
                    "validation_step_interval": cfg.validation_step_interval,
                    "validation_guidance": cfg.validation_guidance}
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if cfg.validation_codec_guidance < 1:
        raise ConfigError(f"validation_codec_guidance must be >= 1 (1 turns the codec's guidance off), "
                          f"got {cfg.validation_codec_guidance}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    for key in ("caption_dropout_probability", "scheduled_sampling_probability", "scheduled_sampling_prob_start",
                "scheduled_sampling_prob_end"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    for key in ("scheduled_sampling_max_step_offset", "scheduled_sampling_ramp_steps",
                "scheduled_sampling_start_step"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    _choice(cfg, "scheduled_sampling_ramp_shape", ("linear", "cosine"))
    _choice(cfg, "scheduled_sampling_sampler", SAMPLERS,
            f" (diffusion solvers {list(DIFFUSION_SOLVERS)} mean 'topk' here)")
    if not 0 < cfg.decoder_fraction <= 1:
        raise ConfigError(f"decoder_fraction must be in (0, 1], got {cfg.decoder_fraction}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit must be >= 1 (or null for no limit), "
                          f"got {cfg.checkpoints_total_limit}")
    if cfg.max_train_steps == 0 and cfg.num_train_epochs == 0:
        raise ConfigError("set max_train_steps (> 0) or num_train_epochs (> 0): both are 0")
    if cfg.data_backend_config is None:
        raise ConfigError("data_backend_config is required: the path of your multidatabackend.json")
    if cfg.lora_target_modules is not None and not cfg.lora_target_modules:
        raise ConfigError("lora_target_modules is empty (leave it out for the default layers)")
    if cfg.device != "auto" and cfg.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {cfg.device!r} is not supported: auto, cpu, cuda[:N] or mps")
    # input files must exist now, not after the model has loaded
    cfg.data_backend_config = str(resolve_input(cfg, "data_backend_config", must_exist=True))
    if cfg.init_lora is not None:
        cfg.init_lora = str(resolve_input(cfg, "init_lora", must_exist=True))
    for key in ("pretrained_model_name_or_path", "tokenizer_path", "gen_config_path", "codec_path"):
        if getattr(cfg, key) is not None:
            setattr(cfg, key, str(resolve_input(cfg, key, must_exist=False)))
    if str(cfg.resume_from_checkpoint).lower() in ("none", "false", ""):
        cfg.resume_from_checkpoint = None


def resolve_input(cfg: TrainConfig, key: str, must_exist: bool) -> Path | str:
    """cwd-relative like SimpleTuner; else beside the config file when it exists there. A value that exists
    nowhere is returned unchanged (it may be a Hugging Face repo id) unless must_exist."""
    value = str(getattr(cfg, key))
    p = Path(value).expanduser()
    beside = Path(cfg.config_path).resolve().parent / p if cfg.config_path and not p.is_absolute() else None
    builtin = cfg.config_path is not None and Path(cfg.config_path).resolve() == BUILTIN_CONFIG
    if builtin and beside is not None and beside.exists():  # the shipped default ignores the cwd
        return beside
    if p.exists():
        return p
    if beside is not None and beside.exists():
        return beside
    if must_exist:
        where = f" (nor beside {cfg.config_path})" if cfg.config_path and not p.is_absolute() else ""
        raise ConfigError(f"{key}: {value} does not exist{where}")
    return value
