//! Test helpers for virtio devices and the MMIO transport: a dummy device and a driver's
//! side of the register protocol.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::{
    ActivateContext, ActivateError, FeaturesRefused, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::BusDevice;

pub const MAX: u16 = 256;
pub const HIGH_MEM: u64 = 1 << 32;

#[derive(Default)]
pub struct Dummy {
    pub features: u64,
    pub acked: Option<u64>,
    pub config: [u8; 8],
    pub generation: u32,
    pub activations: usize,
    pub resets: usize,
    pub refuse: bool,
    pub ctx: Option<ActivateContext>,
    pub max: Vec<u16>,
    /// What `queues_needed` answers; `None`: the trait's default (every queue).
    pub needed: Option<usize>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        crate::devices::virtio::TYPE_MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) -> Result<(), FeaturesRefused> {
        self.acked = Some(features);
        Ok(())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = self.config.get(offset as usize + i) {
                *b = *v;
            }
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(v) = self.config.get_mut(offset as usize + i) {
                *v = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.refuse {
            return Err(ActivateError::Device("refused".into()));
        }
        self.activations += 1;
        self.ctx = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.ctx = None;
    }
    fn config_generation(&self) -> u32 {
        self.generation
    }
    fn queues_needed(&self, _acked: u64) -> usize {
        self.needed.unwrap_or(self.max.len())
    }
}

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(HIGH_MEM), 0x10000),
    ])
    .unwrap()
}

pub fn transport_on(dummy: Dummy, mem: GuestMemoryMmap) -> (Arc<Mutex<Dummy>>, MmioTransport) {
    let dev = Arc::new(Mutex::new(Dummy {
        max: vec![MAX],
        ..dummy
    }));
    let t = MmioTransport::new(dev.clone(), vm_memory::GuestMemoryAtomic::new(mem)).unwrap();
    (dev, t)
}

pub fn transport_with(dummy: Dummy) -> (Arc<Mutex<Dummy>>, MmioTransport) {
    transport_on(dummy, memory())
}

pub fn default_dummy() -> Dummy {
    Dummy {
        features: 1 << VIRTIO_RING_F_EVENT_IDX | 1 << 3,
        ..Default::default()
    }
}

pub fn transport() -> (Arc<Mutex<Dummy>>, MmioTransport) {
    transport_with(default_dummy())
}

pub fn r(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

pub fn w(t: &mut MmioTransport, reg: u32, value: u32) {
    t.write(u64::from(reg), &value.to_le_bytes());
}

pub fn w64(t: &mut MmioTransport, low: u32, value: u64) {
    w(t, low, value as u32);
    w(t, low + 4, (value >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, the given features, FEATURES_OK; returns the status read back.
pub fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    r(t, VIRTIO_MMIO_STATUS)
}

pub fn setup_queue(t: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) {
    w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(t, VIRTIO_MMIO_QUEUE_NUM, size);
    w64(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
    w64(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail);
    w64(t, VIRTIO_MMIO_QUEUE_USED_LOW, used);
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

pub fn driver_ok(t: &mut MmioTransport) {
    let s = r(t, VIRTIO_MMIO_STATUS);
    w(t, VIRTIO_MMIO_STATUS, s | DRIVER_OK);
}

pub const V1: u64 = 1 << VIRTIO_F_VERSION_1;

/// A good setup: rings in low memory except the used ring, which sits above 4 GiB.
pub fn bring_up(t: &mut MmioTransport) {
    assert_ne!(
        negotiate(t, V1 | 1 << VIRTIO_RING_F_EVENT_IDX) & FEATURES_OK,
        0
    );
    setup_queue(t, 16, 0x1000, 0x2000, HIGH_MEM + 0x100);
    driver_ok(t);
}
