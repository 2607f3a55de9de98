"""The batch vocabulary. No string batch key appears anywhere else in the code base.

A batch is ``dict[str, Tensor]``; code never mutates a batch it receives. Shapes are given for a
collated batch (leading ``B``); a single dataset sample has the same keys without ``B``.

Inputs (written by ``vla_ft.data``, read by ``vla_ft.models``/``vla_ft.losses``):
    IMAGES          uint8  (B, T, K, 3, H, W)  T = history length, K = cameras (order = image_keys)
    STATE           float32 (B, T, S)          proprio, normalized, concatenated state_keys
    INSTR_IDS       int64  (B, L)              instruction tokens (right-padded)
    INSTR_MASK      int64  (B, L)              1 = real token, 0 = padding
    ACTION          float32 (B, H, A)          action chunk t..t+H-1, normalized
    ACTION_IS_PAD   bool   (B, H)              True where t+h is past the episode end
    TASK_ID         int64  (B,)                index into the dataset's task list
    PROGRESS        float32 (B,)               t / (T_episode - 1) in [0, 1]
    WAYPOINT        float32 (B, 3)             where the end effector is at the next gripper
                                               open/close (or the episode end) minus where it is
                                               now, per axis / its training std; only when the
                                               data has an end-effector position (data.waypoint_key)
    TARGET_UV       float32 (B, K, 2, 2)       image (x, y) in [-1, 1] (x right, y down) per camera
                                               of [named object, destination] at the current frame;
                                               NaN where unknown; only when the files carry
                                               targets/<image key> (our collector writes them)

Outputs (written by ``VLAPolicy.forward``):
    OUT_ACTION        float32 (B, H, A)        predicted chunk (normalized units)
    OUT_ACTION_LOGITS float32 (B, H, A, NB)    binned-action head only
    OUT_TASK_LOGITS   float32 (B, NT)          task-id classification
    OUT_PROGRESS      float32 (B,)             progress regression
    OUT_WAYPOINT      float32 (B, 3)           next-waypoint regression (same units as WAYPOINT)
    OUT_HEATMAP       float32 (B, K, P, h, w)  keypoint heat-map logits of the current frame per
                                               camera (FiLM backbones with keypoints only)
    OUT_HIDDEN        float32 (B, N, D)        final hidden states (optional)
    OUT_FLOW_ERR      float32 (B, H, A)        flow head, training: squared error of the predicted
                                               velocity at the sampled time (OUT_ACTION is then the
                                               one-step estimate x_t - t * v_t)
"""

IMAGES = "observation.images"
STATE = "observation.state"
INSTR_IDS = "instruction.input_ids"
INSTR_MASK = "instruction.attention_mask"
ACTION = "action"
ACTION_IS_PAD = "action.is_pad"
TASK_ID = "task.id"
PROGRESS = "task.progress"
WAYPOINT = "task.waypoint"
TARGET_UV = "task.target_uv"

INPUT_KEYS = (
    IMAGES,
    STATE,
    INSTR_IDS,
    INSTR_MASK,
    ACTION,
    ACTION_IS_PAD,
    TASK_ID,
    PROGRESS,
    WAYPOINT,
    TARGET_UV,
)

OUT_ACTION = "pred.action"
OUT_ACTION_LOGITS = "pred.action_logits"
OUT_TASK_LOGITS = "pred.task_logits"
OUT_PROGRESS = "pred.progress"
OUT_WAYPOINT = "pred.waypoint"
OUT_HEATMAP = "pred.heatmap"
OUT_HIDDEN = "pred.hidden"
OUT_FLOW_ERR = "pred.flow_error"

# Module names used for parameter-group metadata (discriminative / layer-wise learning rates).
MODULE_VISION = "vision"
MODULE_LANGUAGE = "language"
MODULE_PROJECTOR = "projector"
MODULE_HEADS = "heads"
MODULES = (MODULE_VISION, MODULE_LANGUAGE, MODULE_PROJECTOR, MODULE_HEADS)
