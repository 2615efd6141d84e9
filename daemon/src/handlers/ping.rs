use gpuctl_protocol::{PingRequest, PingResponse};

pub fn handle(_request: PingRequest) -> PingResponse {
    PingResponse {}
}
