//! The packets a connection has for the guest, in order of priority: RESPONSE, REQUEST,
//! data (within the guest's credit), SHUTDOWN, CREDIT_REQUEST, CREDIT_UPDATE.

use std::num::Wrapping;

use super::super::defs::*;
use super::super::header::Hdr;
use super::super::VSOCK_HOST_CID;
use super::{Connection, State, TX_BUF_SIZE};

impl Connection {
    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.rx_buf.is_empty()
            && self.peer_credit() > 0
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.response
            || p.request
            || self.can_send_data()
            || p.shutdown
            || p.credit_request
            || p.credit_update
    }

    /// The next packet for the guest, with at most `max_data` bytes of payload, which go
    /// to `data` (cleared first). Every packet carries our current credit.
    pub fn next_pkt(&mut self, max_data: usize, data: &mut Vec<u8>) -> Option<Hdr> {
        data.clear();
        let mut flags = 0;
        let op = if std::mem::take(&mut self.pending.response) {
            OP_RESPONSE
        } else if std::mem::take(&mut self.pending.request) {
            self.request_sent = true;
            OP_REQUEST
        } else if self.can_send_data() && max_data > 0 {
            let n = self
                .rx_buf
                .len()
                .min(self.peer_credit() as usize)
                .min(max_data);
            data.extend(self.rx_buf.drain(..n));
            self.rx_cnt += Wrapping(n as u32);
            OP_RW
        } else if std::mem::take(&mut self.pending.shutdown) {
            flags = self.local_shutdown;
            OP_SHUTDOWN
        } else if std::mem::take(&mut self.pending.credit_request) {
            OP_CREDIT_REQUEST
        } else if self.pending.credit_update {
            OP_CREDIT_UPDATE
        } else {
            return None;
        };
        self.pending.credit_update = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some(Hdr {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        })
    }
}
