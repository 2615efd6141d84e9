//! Tensors a client streams ahead of its requests (`TensorBegin`,
//! `TensorChunk`, `TensorEnd`), held per request id until the request
//! arrives and takes them. A stream that breaks a rule, the connection's
//! `daemon.max_upload`, the daemon-wide `daemon.max_upload_total` or
//! `daemon.upload_timeout` is refused: its memory goes at once, its further
//! frames are dropped, and its request, when it comes, is answered with the
//! reason. Nothing else on the connection is disturbed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpuctl_protocol::units::{format_bytes, format_duration_ms};
use gpuctl_protocol::{
    DType, Error, ErrorCode, Request, RequestId, StreamError, TensorReceiver, WireTensor,
};

use crate::budget::{Budget, Permit};

/// What was streamed for one request id.
struct Upload {
    received: TensorReceiver,
    /// Its bytes in the daemon-wide budget.
    permit: Permit,
    /// When its first frame came.
    since: Instant,
    /// Why it was refused, when the reason is not the receiver's own.
    refused: Option<Error>,
}

/// One connection's streamed tensors.
pub struct Uploads {
    limit: usize,
    timeout: Duration,
    budget: Budget,
    receiving: HashMap<RequestId, Upload>,
}

impl Uploads {
    /// Holds at most `limit` bytes at a time, each stream for at most
    /// `timeout`, within the daemon-wide `budget`.
    pub fn new(limit: usize, timeout: Duration, budget: Budget) -> Uploads {
        Uploads {
            limit,
            timeout,
            budget,
            receiving: HashMap::new(),
        }
    }

    /// Bytes held (announced) for requests that have not arrived yet.
    pub fn held(&self) -> usize {
        self.receiving.values().map(|u| u.received.bytes()).sum()
    }

    /// Requests with tensors streamed for them and not yet sent.
    pub fn streams(&self) -> usize {
        self.receiving.len()
    }

    fn upload(&mut self, id: RequestId) -> &mut Upload {
        let budget = &self.budget;
        self.receiving.entry(id).or_insert_with(|| Upload {
            received: TensorReceiver::default(),
            permit: budget.nothing(),
            since: Instant::now(),
            refused: None,
        })
    }

    pub fn begin(&mut self, id: RequestId, dtype: DType, shape: Vec<u64>) {
        let room = self.limit.saturating_sub(self.held());
        let budget = self.budget.clone();
        let upload = self.upload(id);
        if upload.refused.is_some() || !upload.received.is_sound() {
            return;
        }
        // Refused by the receiver's own rules when it is not a size that
        // fits this connection: only then does the daemon-wide budget count.
        let size = WireTensor::placeholder(dtype, shape.clone())
            .byte_len()
            .filter(|size| *size <= room);
        if let Some(size) = size {
            match budget.take(size) {
                Some(permit) => upload.permit.merge(permit),
                None => {
                    let error = Error::new(
                        ErrorCode::Busy,
                        format!(
                            "a streamed tensor of shape {shape:?} ({}) would take gpuctld past daemon.max_upload_total ({}; {} held for all clients); try again later",
                            format_bytes(size as u64),
                            format_bytes(budget.limit() as u64),
                            format_bytes(budget.held() as u64)
                        ),
                    );
                    upload.refuse(error);
                    return;
                }
            }
        }
        upload.received.begin(dtype, shape, room);
        if !upload.received.is_sound() {
            upload.permit.release();
        }
    }

    pub fn chunk(&mut self, id: RequestId, data: &[u8]) {
        let upload = self.upload(id);
        if upload.refused.is_none() {
            upload.received.chunk(data);
        }
    }

    pub fn end(&mut self, id: RequestId) {
        let upload = self.upload(id);
        if upload.refused.is_none() {
            upload.received.end();
        }
    }

    /// When the oldest stream still held runs out of time.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.receiving
            .values()
            .filter(|u| u.refused.is_none())
            .map(|u| u.since + self.timeout)
            .min()
    }

    /// Drops what was streamed for requests that did not come in time.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        for (id, upload) in &mut self.receiving {
            if upload.refused.is_none() && now.duration_since(upload.since) >= timeout {
                tracing::info!(
                    request = id,
                    bytes = upload.received.bytes(),
                    "streamed tensors dropped: their request did not come in time"
                );
                upload.refuse(Error::new(
                    ErrorCode::Timeout,
                    format!(
                        "the tensors streamed for request {id} were dropped: the request did not come within {} (daemon.upload_timeout)",
                        format_duration_ms(timeout.as_millis() as u64)
                    ),
                ));
            }
        }
    }

    /// Gives request `id` what was streamed for it, with its share of the
    /// daemon-wide budget to hold until the request ends; or the reason
    /// its stream was refused.
    pub fn attach(&mut self, id: RequestId, request: &mut Request) -> Result<Permit, Error> {
        let Some(upload) = self.receiving.remove(&id) else {
            return match request.generate_mut() {
                Some(generate) => TensorReceiver::default()
                    .fill(generate.tensors_mut())
                    .map(|()| self.budget.nothing())
                    .map_err(|e| self.error(e)),
                None => Ok(self.budget.nothing()),
            };
        };
        if let Some(refused) = upload.refused {
            return Err(refused);
        }
        let Upload {
            received, permit, ..
        } = upload;
        let operation = request.operation();
        let result = match request.generate_mut() {
            Some(generate) => received.fill(generate.tensors_mut()),
            None if received.bytes() > 0 || !received.is_sound() => Err(StreamError::Broken(
                format!("tensors were streamed for request {id}, but {operation} takes none"),
            )),
            None => Ok(()),
        };
        result.map(|()| permit).map_err(|e| self.error(e))
    }

    fn error(&self, error: StreamError) -> Error {
        match error {
            StreamError::TooLarge { shape, bytes, room } => Error::new(
                ErrorCode::TooLarge,
                format!(
                    "a streamed tensor of shape {shape:?} ({}) would take this connection past daemon.max_upload ({}; {} held already)",
                    format_bytes(bytes),
                    format_bytes(self.limit as u64),
                    format_bytes((self.limit as u64).saturating_sub(room))
                ),
            ),
            StreamError::OutOfMemory { .. } => Error::new(ErrorCode::TooLarge, error.to_string()),
            StreamError::Broken(problem) => Error::new(ErrorCode::InvalidRequest, problem),
        }
    }
}

impl Upload {
    /// Drops what it holds and keeps only why.
    fn refuse(&mut self, error: Error) {
        self.received = TensorReceiver::default();
        self.permit.release();
        self.refused = Some(error);
    }
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{GenerateRequest, PingRequest, WireTensor};

    use super::*;

    fn uploads(limit: usize) -> Uploads {
        Uploads::new(limit, Duration::from_secs(60), Budget::new(1 << 20))
    }

    fn image_request(shape: Vec<u64>) -> Request {
        Request::Generate(GenerateRequest {
            input: Some(WireTensor::placeholder(DType::U8, shape)),
            ..GenerateRequest::new("up")
        })
    }

    #[test]
    fn a_streamed_image_fills_its_request() {
        let mut uploads = uploads(100);
        uploads.begin(7, DType::U8, vec![1, 3, 2, 2]);
        uploads.chunk(7, &[1; 10]);
        uploads.chunk(7, &[2; 2]);
        uploads.end(7);
        assert_eq!(uploads.held(), 12);
        assert_eq!(uploads.budget.held(), 12);
        let mut request = image_request(vec![1, 3, 2, 2]);
        let permit = uploads.attach(7, &mut request).unwrap();
        let Request::Generate(generate) = request else {
            panic!()
        };
        let input = generate.input.unwrap();
        assert_eq!(input.data[..10], [1; 10]);
        assert_eq!(input.data[10..], [2; 2]);
        assert_eq!(uploads.held(), 0);
        assert_eq!(uploads.budget.held(), 12, "held by the request");
        drop(permit);
        assert_eq!(uploads.budget.held(), 0);
    }

    #[test]
    fn over_the_limit_the_request_gets_the_reason_and_others_go_on() {
        let mut uploads = uploads(100);
        uploads.begin(1, DType::U8, vec![60]);
        uploads.begin(2, DType::F32, vec![1, 3, 4, 4]);
        uploads.chunk(2, &[0; 100]);
        uploads.end(2);
        uploads.chunk(1, &[0; 60]);
        uploads.end(1);
        let error = uploads
            .attach(2, &mut image_request(vec![1, 3, 4, 4]))
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert!(
            error.message.contains("(192 B)") && error.message.contains("daemon.max_upload"),
            "{}",
            error.message
        );
        let Request::Generate(mut generate) = image_request(vec![60]) else {
            panic!()
        };
        generate.input = None;
        generate.inputs = vec![WireTensor::placeholder(DType::U8, vec![60])];
        uploads.attach(1, &mut Request::Generate(generate)).unwrap();
    }

    #[test]
    fn the_daemon_wide_budget_refuses_with_busy_and_frees_on_refusal() {
        let budget = Budget::new(100);
        let mut first = Uploads::new(100, Duration::from_secs(60), budget.clone());
        let mut second = Uploads::new(100, Duration::from_secs(60), budget.clone());
        first.begin(1, DType::U8, vec![80]);
        second.begin(1, DType::U8, vec![30]);
        let error = second.attach(1, &mut image_request(vec![30])).unwrap_err();
        assert_eq!(error.code, ErrorCode::Busy);
        assert!(
            error
                .message
                .contains("daemon.max_upload_total (100 B; 80 B held"),
            "{}",
            error.message
        );
        // A stream over the connection's own limit takes nothing from it.
        second.begin(2, DType::U8, vec![101]);
        assert_eq!(budget.held(), 80);
        drop(first);
        assert_eq!(budget.held(), 0, "a closed connection gives its share back");
    }

    #[test]
    fn streams_whose_request_does_not_come_in_time_are_dropped() {
        let budget = Budget::new(1000);
        let mut uploads = Uploads::new(1000, Duration::from_secs(60), budget.clone());
        uploads.begin(1, DType::U8, vec![500]);
        let start = Instant::now();
        assert!(uploads.next_expiry().is_some_and(|t| t >= start));
        uploads.expire(start + Duration::from_secs(61));
        assert_eq!((uploads.held(), budget.held()), (0, 0));
        assert_eq!(uploads.next_expiry(), None);
        uploads.chunk(1, &[0; 10]);
        let error = uploads
            .attach(1, &mut image_request(vec![500]))
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::Timeout);
        assert!(
            error.message.contains("within 1m (daemon.upload_timeout)"),
            "{}",
            error.message
        );
    }

    #[test]
    fn broken_streams_and_missing_data_are_named() {
        let mut uploads = uploads(100);
        uploads.chunk(3, &[1]);
        let error = uploads.attach(3, &mut image_request(vec![1])).unwrap_err();
        assert!(
            error.message.contains("without TensorBegin"),
            "{}",
            error.message
        );
        let error = uploads
            .attach(4, &mut image_request(vec![1, 3, 2, 2]))
            .unwrap_err();
        assert!(
            error.message.contains("none was streamed"),
            "{}",
            error.message
        );
        uploads.begin(5, DType::U8, vec![1]);
        uploads.chunk(5, &[1]);
        uploads.end(5);
        let error = uploads
            .attach(5, &mut Request::Ping(PingRequest {}))
            .unwrap_err();
        assert!(
            error.message.contains("ping takes none"),
            "{}",
            error.message
        );
    }
}
