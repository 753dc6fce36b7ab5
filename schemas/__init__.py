"""modelyard's message contracts: the only thing components share."""

from schemas.chat import ChatRequest, Message, Tool, ToolCall
from schemas.codec import InvalidMessage, decode_costs, decode_job, decode_reply, encode
from schemas.costs import CostBatch, CostEvent
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import Attempt, CompletionJob, Metadata, Route, TraceContext
from schemas.results import Completion, JobResult, Reply, StreamChunk, Timings, Usage

__all__ = [
    "Attempt",
    "ChatRequest",
    "Completion",
    "CompletionJob",
    "CostBatch",
    "CostEvent",
    "ErrorKind",
    "InvalidMessage",
    "JobError",
    "JobResult",
    "Message",
    "Metadata",
    "Reply",
    "Route",
    "StreamChunk",
    "Timings",
    "Tool",
    "ToolCall",
    "TraceContext",
    "Usage",
    "decode_costs",
    "decode_job",
    "decode_reply",
    "encode",
    "job_error",
]
