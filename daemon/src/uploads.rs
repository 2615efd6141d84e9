//! Tensors a client streams ahead of its requests (`TensorBegin`,
//! `TensorChunk`, `TensorEnd`), held per request id until the request
//! arrives and takes them. A stream that breaks a rule or the connection's
//! `daemon.max_upload` is refused: its further frames are dropped, and its
//! request, when it comes, is answered with the reason. Nothing else on the
//! connection is disturbed.

use std::collections::HashMap;

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{DType, Error, ErrorCode, Request, RequestId, StreamError, TensorReceiver};

/// One connection's streamed tensors.
pub struct Uploads {
    limit: usize,
    receiving: HashMap<RequestId, TensorReceiver>,
}

impl Uploads {
    /// Holds at most `limit` bytes of tensors at a time.
    pub fn new(limit: usize) -> Uploads {
        Uploads {
            limit,
            receiving: HashMap::new(),
        }
    }

    /// Bytes held (announced) for requests that have not arrived yet.
    pub fn held(&self) -> usize {
        self.receiving.values().map(TensorReceiver::bytes).sum()
    }

    /// Requests with tensors streamed for them and not yet sent.
    pub fn streams(&self) -> usize {
        self.receiving.len()
    }

    pub fn begin(&mut self, id: RequestId, dtype: DType, shape: Vec<u64>) {
        let room = self.limit.saturating_sub(self.held());
        self.receiving
            .entry(id)
            .or_default()
            .begin(dtype, shape, room);
    }

    pub fn chunk(&mut self, id: RequestId, data: &[u8]) {
        self.receiving.entry(id).or_default().chunk(data);
    }

    pub fn end(&mut self, id: RequestId) {
        self.receiving.entry(id).or_default().end();
    }

    /// Gives request `id` what was streamed for it, or the reason its
    /// stream was refused.
    pub fn attach(&mut self, id: RequestId, request: &mut Request) -> Result<(), Error> {
        let streamed = self.receiving.remove(&id).unwrap_or_default();
        let result = match request {
            Request::Generate(generate) => streamed.fill(generate.tensors_mut()),
            _ if streamed.bytes() > 0 => Err(StreamError::Broken(format!(
                "tensors were streamed for request {id}, but {} takes none",
                request.operation()
            ))),
            _ => Ok(()),
        };
        result.map_err(|error| match error {
            StreamError::TooLarge { shape, bytes, room } => Error::new(
                ErrorCode::TooLarge,
                format!(
                    "a streamed tensor of shape {shape:?} ({}) would take this connection past daemon.max_upload ({}; {} held already)",
                    format_bytes(bytes),
                    format_bytes(self.limit as u64),
                    format_bytes((self.limit as u64).saturating_sub(room))
                ),
            ),
            StreamError::Broken(problem) => Error::new(ErrorCode::InvalidRequest, problem),
        })
    }
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{GenerateRequest, PingRequest, WireTensor};

    use super::*;

    fn image_request(shape: Vec<u64>) -> Request {
        Request::Generate(GenerateRequest {
            input: Some(WireTensor::placeholder(DType::U8, shape)),
            ..GenerateRequest::new("up")
        })
    }

    #[test]
    fn a_streamed_image_fills_its_request() {
        let mut uploads = Uploads::new(100);
        uploads.begin(7, DType::U8, vec![1, 3, 2, 2]);
        uploads.chunk(7, &[1; 10]);
        uploads.chunk(7, &[2; 2]);
        uploads.end(7);
        assert_eq!(uploads.held(), 12);
        let mut request = image_request(vec![1, 3, 2, 2]);
        uploads.attach(7, &mut request).unwrap();
        let Request::Generate(generate) = request else {
            panic!()
        };
        let input = generate.input.unwrap();
        assert_eq!(input.data[..10], [1; 10]);
        assert_eq!(input.data[10..], [2; 2]);
        assert_eq!(uploads.held(), 0);
    }

    #[test]
    fn over_the_limit_the_request_gets_the_reason_and_others_go_on() {
        let mut uploads = Uploads::new(100);
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
    fn broken_streams_and_missing_data_are_named() {
        let mut uploads = Uploads::new(100);
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
