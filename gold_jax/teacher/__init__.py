"""Teacher server, client and backends (ZeroMQ + msgpack; never pickle on the wire)."""
from gold_jax.teacher.client import TeacherClient, TeacherError
from gold_jax.teacher.local import LocalTeacher, start_local_teacher

__all__ = ["LocalTeacher", "TeacherClient", "TeacherError", "start_local_teacher"]
