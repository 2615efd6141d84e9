//! Blocking frames over the socketpair: the worker does one thing at a
//! time, so it needs no async runtime.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use gpuctl_protocol::worker::{DaemonToWorker, WorkerToDaemon};
use gpuctl_protocol::{decode_payload, encode_payload, FrameError, WireTensor, MAX_FRAME_CEILING};

/// The worker's end of the socketpair.
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Channel {
        Channel { stream }
    }

    /// A second handle on the same socket, for a reader thread.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            stream: self.stream.try_clone()?,
        })
    }

    /// The next frame, or `None` when the daemon closed its end.
    pub fn receive(&mut self) -> Result<Option<DaemonToWorker>, FrameError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        let length = u32::from_be_bytes(header) as usize;
        if length > MAX_FRAME_CEILING {
            return Err(FrameError::TooLarge {
                max: MAX_FRAME_CEILING,
            });
        }
        let mut payload = vec![0u8; length];
        self.stream.read_exact(&mut payload)?;
        decode_payload(&payload).map(Some)
    }

    /// Streams one output of job `id` ahead of the `Done` that holds it as
    /// a placeholder.
    pub fn send_tensor(&self, id: u64, tensor: WireTensor) -> Result<(), FrameError> {
        for frame in gpuctl_protocol::stream::frames(tensor) {
            self.send(&WorkerToDaemon::Tensor { id, frame })?;
        }
        Ok(())
    }

    /// Writes one frame. `&self`: a job's progress and its rows are sent
    /// from the same loop, and writes to a Unix socket need no exclusive
    /// handle.
    pub fn send(&self, message: &WorkerToDaemon) -> Result<(), FrameError> {
        let payload = encode_payload(message)?;
        if payload.len() > MAX_FRAME_CEILING {
            return Err(FrameError::TooLarge {
                max: MAX_FRAME_CEILING,
            });
        }
        let length = (payload.len() as u32).to_be_bytes();
        (&self.stream).write_all(&length)?;
        (&self.stream).write_all(&payload)?;
        Ok(())
    }
}
