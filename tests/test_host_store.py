"""Packing host weights: host memory holds about one copy of the weights while packing, not one per thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_compression import make_dit

import offload_map.runtime.host_store as host_store
from offload_map import dispatch_pipeline
from offload_map.runtime.unit import OffloadedUnit


def test_units_packed_at_once_stay_within_the_in_flight_bytes(monkeypatch):
    model = make_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    lock, live, peak = threading.Lock(), [0], [0]

    class Counted(host_store.HostBuffer):
        # A unit is held twice from its buffer's allocation until its tensors are rebound to it.
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            with lock:
                live[0] += self.nbytes
                peak[0] = max(peak[0], live[0])
            time.sleep(0.05)  # packing takes a while: the other threads start theirs meanwhile

    bind_host = OffloadedUnit.bind_host

    def bind_and_count(unit) -> None:
        bind_host(unit)
        with lock:
            live[0] -= unit.host.nbytes

    monkeypatch.setattr(host_store, "HostBuffer", Counted)
    monkeypatch.setattr(OffloadedUnit, "bind_host", bind_and_count)
    monkeypatch.setattr(host_store, "PACK_THREADS", 8)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", int(2.5 * block))
    handle = dispatch_pipeline(model, "layerwise", "cpu")
    assert live[0] == 0 and 0 < peak[0] <= 2 * block  # 8 threads, 5 blocks: two at a time
    handle.remove()


def test_a_unit_larger_than_the_in_flight_bytes_still_packs(monkeypatch):
    monkeypatch.setattr(host_store, "PACK_THREADS", 8)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", 1)
    model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu")
    assert len(handle.runtime.host.units) == 5
    handle.remove()


def test_blocks_read_from_a_checkpoint_pack_side_by_side(tmp_path, monkeypatch):
    # Read from a checkpoint, a block's tensors are on the meta device: it is held once, so reads run in parallel
    # (a disk needs several in flight) however small the in-flight bytes.
    from diffusers import FluxTransformer2DModel

    from offload_map import empty_model
    from offload_map.loading.weights import WeightSource

    from tiny_pipelines import make_flux_pipeline

    make_flux_pipeline().transformer.save_pretrained(tmp_path)
    lock, reading, most = threading.Lock(), [0], [0]
    read_into = WeightSource.read_into

    def slow_read(source, ref, out) -> None:
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        time.sleep(0.02)
        read_into(source, ref, out)
        with lock:
            reading[0] -= 1

    monkeypatch.setattr(WeightSource, "read_into", slow_read)
    monkeypatch.setattr(host_store, "PACK_THREADS", 4)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", 1)
    model = empty_model(FluxTransformer2DModel, tmp_path)
    handle = dispatch_pipeline(model, "layerwise", "cpu", weights=str(tmp_path))
    assert most[0] > 1
    handle.remove()


def test_the_setup_report_says_how_long_coding_waited_for_the_device():
    from offload_map.runtime.coded_host import DEVICE_CODING
    from offload_map.runtime.report import SetupTimes

    before, inside = DEVICE_CODING.waited_s, threading.Event()

    def first() -> None:
        with DEVICE_CODING:
            inside.set()
            time.sleep(0.2)

    def second() -> None:
        inside.wait()  # the first holds its turn by now
        with DEVICE_CODING:
            pass

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert DEVICE_CODING.waited_s - before >= 0.05  # the second waited for the first's turn
    times = SetupTimes(pack_wall_s=1.0, code_s=2.0, code_wait_s=1.5)
    assert "coding blocks 2.00 s (1.50 s of it waiting for the device)" in str(times)


def test_a_failed_unit_stops_the_units_waiting_for_their_turn(monkeypatch):
    # Units waiting for in-flight room give up as soon as another fails (or Ctrl-C), rather than pack one by one
    # before the error shows; the error raised is the unit's own.
    made = [0]

    class Failing(host_store.HostBuffer):
        def __init__(self, *args, **kwargs) -> None:
            made[0] += 1
            if made[0] == 1:
                time.sleep(0.05)  # the others are waiting for their turn by now
                raise OSError("disk gone")
            super().__init__(*args, **kwargs)

    model = make_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    monkeypatch.setattr(host_store, "HostBuffer", Failing)
    monkeypatch.setattr(host_store, "PACK_THREADS", 8)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", int(1.5 * block))  # one unit at a time
    weight = model.blocks[0].up.weight
    with pytest.raises(OSError, match="disk gone"):
        dispatch_pipeline(model, "layerwise", "cpu")
    assert made[0] == 1  # none of the four waiting was packed
    assert model.blocks[0].up.weight is weight and not hasattr(model, "_hf_hook")


def test_units_fill_while_another_codes_and_a_failed_code_restores_every_unit(monkeypatch):
    # Coding runs once a unit is bound: its originals are gone and its code is kept, so it holds nothing twice. It
    # used to run inside the in-flight room, which kept other units from starting (most of a coded setup).
    import torch
    from test_compression import _input

    from conftest import assert_restored, pipeline_state

    monkeypatch.setattr(host_store, "PACK_THREADS", 4)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", 1)  # one unit in the room at a time
    filled = threading.Event()
    write, code = host_store.HostBuffer.write, host_store.HostStore._code
    coding, saw_fill = [], []

    def write_and_note(buffer, index, tensor) -> None:
        write(buffer, index, tensor)
        if coding:
            filled.set()  # a unit filled while another was coding

    def code_slowly(store, unit, buffer, device):
        coding.append(unit.path)
        saw_fill.append(filled.wait(timeout=5))
        if unit.path == "blocks.3":
            raise RuntimeError("coding failed")
        return code(store, unit, buffer, device)

    monkeypatch.setattr(host_store.HostBuffer, "write", write_and_note)
    monkeypatch.setattr(host_store.HostStore, "_code", code_slowly)
    model, x = make_dit(), _input()
    before = pipeline_state(model)
    with pytest.raises(RuntimeError, match="coding failed"):
        dispatch_pipeline(model, "layerwise", "cpu", compression="lossless")
    assert saw_fill[0], "no unit filled while the first one coded"
    assert_restored(model, before)
    # Each tensor has its own storage again: none still views a host buffer (on the CPU, values alone match).
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(host_store.HostStore, "_code", code)
    handle = dispatch_pipeline(model, "layerwise", "cpu", compression="lossless")
    with torch.inference_mode():
        out = model(x)
    handle.remove()
    with torch.inference_mode():
        assert torch.equal(out, model(x))


def test_a_second_interrupt_while_units_finish_coding_still_restores_every_unit(monkeypatch):
    # Ctrl-C twice: the first stops packing while units code, and the main thread waits for them; the second lands
    # in that wait. Units register themselves as soon as they are bound, so the restore still finds every one.
    # Both are raised by the waits themselves: a simulated SIGINT (``_thread.interrupt_main``) lands only once the
    # main thread runs Python code again, and in the whole suite it was now and then swallowed before that.
    from conftest import assert_restored, pipeline_state

    monkeypatch.setattr(host_store, "PACK_THREADS", 4)
    code = host_store.HostStore._code
    coding = threading.Event()
    waits = []

    def slow(store, unit, buffer, device):
        coding.set()
        time.sleep(0.5)  # still coding when the second interrupt lands
        return code(store, unit, buffer, device)

    def interrupted(futures, **kwargs):
        waits.append(kwargs)
        if len(waits) == 1:
            coding.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(host_store.HostStore, "_code", slow)
    monkeypatch.setattr(host_store, "wait", interrupted)
    model = make_dit()
    before = pipeline_state(model)
    with pytest.raises(KeyboardInterrupt):
        dispatch_pipeline(model, "layerwise", "cpu", compression="lossless")
    assert len(waits) == 2  # the second landed in the wait for the units still coding
    assert_restored(model, before)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


def interrupt_once(monkeypatch, owner, name: str, at: int, error: type[BaseException] = KeyboardInterrupt) -> list:
    """Make call number ``at`` of ``owner.name`` raise ``error`` instead of running (by default as Ctrl-C there
    would); returns every call's first argument."""
    original, calls = getattr(owner, name), []

    def interrupted(*args):
        calls.append(args[0])
        if len(calls) == at:
            raise error
        return original(*args)

    monkeypatch.setattr(owner, name, interrupted)
    return calls


def test_remove_again_after_an_interrupt_while_restoring_puts_back_every_unit(monkeypatch):
    from conftest import assert_restored, pipeline_state

    model = make_dit()
    before = pipeline_state(model)
    handle = dispatch_pipeline(model, "layerwise", "cpu", progress=False)
    units = len(handle.runtime.host.units)
    calls = interrupt_once(monkeypatch, OffloadedUnit, "restore", at=3)
    with pytest.raises(KeyboardInterrupt):
        handle.remove()
    handle.remove()
    assert len(calls) == units + 1  # the interrupted unit was restored the second time
    assert_restored(model, before)


@pytest.mark.parametrize("compression", [None, "fp8"])
@torch.inference_mode()
def test_remove_again_after_an_interrupt_while_a_ring_settles_puts_back_every_block(monkeypatch, compression):
    # A forward that raised leaves a block in its slot; the interrupted settle must be retried, or that block keeps
    # viewing the slot (with fp8, its decoded weights) after remove().
    from test_compression import _input

    from offload_map.runtime.prefetcher import Prefetcher

    model, twin = make_dit(), make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=2, compression=compression, progress=False)

    def failed(x):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model.blocks[1].down, "forward", failed)
    with pytest.raises(RuntimeError, match="forward failed"):
        model(_input())
    monkeypatch.undo()
    interrupt_once(monkeypatch, Prefetcher, "settle", at=1)
    with pytest.raises(KeyboardInterrupt):
        handle.remove()
    handle.remove()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


def test_remove_again_after_an_interrupt_while_taking_hooks_off_takes_every_hook_off(monkeypatch):
    from offload_map.runtime import hooks

    model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", progress=False)
    interrupt_once(monkeypatch, hooks, "detach", at=2)
    with pytest.raises(KeyboardInterrupt):
        handle.remove()
    handle.remove()
    assert not [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]


@pytest.mark.parametrize("interrupted", ["refresh", "remove"])
@torch.inference_mode()
def test_refresh_after_an_interrupt_while_restoring_dispatches_again(monkeypatch, interrupted):
    from test_compression import DIM, _input

    model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=2, progress=False)
    reference = model(_input())
    if interrupted == "refresh":
        model.blocks[2].gate = torch.nn.Linear(DIM, DIM, dtype=torch.bfloat16)  # not run: the outputs stay
    interrupt_once(monkeypatch, OffloadedUnit, "restore", at=3)
    with pytest.raises(KeyboardInterrupt):
        getattr(handle, interrupted)()
    handle.refresh()  # the guards that would show a change went with the first restore's hooks
    units = handle.runtime.host.units.values()
    if interrupted == "refresh":
        assert any(ref.qualname == "blocks.2.gate.weight" for unit in units for ref in unit.refs)
    assert all(unit.bound for unit in units) and handle.runtime.rings  # dispatched again
    assert torch.equal(model(_input()), reference)
    handle.remove()


def test_an_error_while_restoring_one_unit_leaves_the_others_restored(monkeypatch):
    model, twin = make_dit(), make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", progress=False)
    calls = interrupt_once(monkeypatch, OffloadedUnit, "restore", at=3, error=RuntimeError)
    with pytest.raises(RuntimeError):
        handle.remove()
    failed = calls[2].path + "."
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not name.startswith(failed):
            assert torch.equal(p, q) and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    assert not [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]
    assert handle.runtime.restoring  # the hooks are gone: a refresh() now would dispatch again
    handle.remove()  # nothing is left to undo, and the unit that failed is not tried again
    assert len({unit.path for unit in calls}) == len(calls)


def test_an_interrupt_while_counting_a_wait_leaves_the_device_coding_turn_and_room_free(monkeypatch):
    # Both are process-wide: one left taken would hang every later coded dispatch.
    from offload_map.runtime import coded_host

    coding = coded_host._DeviceCoding()

    class Interrupted:
        def __enter__(self):
            raise KeyboardInterrupt

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(coding, "_counted", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        with coding:
            pass
    with pytest.raises(KeyboardInterrupt):
        with coding.room():
            pass
    assert coding._turn.acquire(blocking=False)
    assert all(coding._room.acquire(blocking=False) for _ in range(coded_host.CODES_ON_DEVICE))


def test_no_unit_starts_coding_once_a_coding_failure_stopped_packing(monkeypatch):
    monkeypatch.setattr(host_store, "PACK_THREADS", 4)
    monkeypatch.setattr(host_store, "PACK_IN_FLIGHT", 1)  # units fill one after another
    write = host_store.HostBuffer.write

    def slow_write(buffer, index, tensor) -> None:
        time.sleep(0.05)  # the next unit is still filling when the first one's coding fails
        write(buffer, index, tensor)

    started = []

    def failing(store, unit, buffer, device):
        started.append(unit.path)
        time.sleep(0.02)  # the next unit has entered the room and fills meanwhile
        raise RuntimeError("coding failed")

    monkeypatch.setattr(host_store.HostBuffer, "write", slow_write)
    monkeypatch.setattr(host_store.HostStore, "_code", failing)
    with pytest.raises(RuntimeError, match="coding failed"):
        dispatch_pipeline(make_dit(), "layerwise", "cpu", compression="lossless")
    assert len(started) == 1, started


@torch.inference_mode()
def test_a_whole_component_lets_each_original_go_once_it_is_written(monkeypatch, target):
    # A pinned component is one unit. Its tensors used to be rebound only once all of them were written, so host
    # memory held the whole component twice while it packed (Flux's transformer: host RSS 35 -> 59 GB on the H200).
    from test_compression import _input, _reference

    model, x = make_dit(), _input().to(target)
    tensors = [*model.parameters(), *model.buffers()]
    write, seen = host_store.HostBuffer.write, []

    def write_and_look(buffer, index, tensor) -> None:
        start = buffer.flat.data_ptr()
        seen.append((index, sum(start <= t.data_ptr() < start + buffer.nbytes for t in tensors)))
        write(buffer, index, tensor)

    monkeypatch.setattr(host_store.HostBuffer, "write", write_and_look)
    monkeypatch.setattr(host_store, "PACK_RUN", 1, raising=False)  # the heap is trimmed after every tensor
    handle = dispatch_pipeline(model, "model", target)
    assert len(seen) == len(tensors)
    assert all(viewing == index for index, viewing in seen)  # every tensor written before views the buffer already
    assert torch.equal(model(x).cpu(), _reference(0, target))
    handle.remove()


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@torch.inference_mode()
def test_a_whole_component_that_fails_halfway_through_packing_is_restored(monkeypatch, target, error):
    # Half of its tensors view its buffer by then: those get their own storage on their device back, the rest
    # never moved.
    from test_compression import _input, _reference

    from conftest import assert_restored, pipeline_state

    model, x = make_dit().to(target), _input().to(target)
    before = pipeline_state(model)
    interrupt_once(monkeypatch, host_store.HostBuffer, "write", at=len(before) // 2, error=error)
    with pytest.raises(error):
        dispatch_pipeline(model, "model", target)
    assert_restored(model, before)
    assert torch.equal(model(x).cpu(), _reference(0, target))


def test_a_second_interrupt_while_a_whole_component_packs_restores_it_once_it_is_written(monkeypatch):
    # The unit's tensors are rebound one by one as they are written: a restore that ran while its thread still wrote
    # would give back the tensors rebound so far, then the thread would rebind more to the released buffer. The
    # packing threads' pool waits for them as it closes, before the restore.
    from conftest import assert_restored, pipeline_state

    writing, waits, restoring, late = threading.Event(), [], [], []
    write, restore = host_store.HostBuffer.write, host_store.HostStore.restore

    def slow_write(buffer, index, tensor) -> None:
        writing.set()
        time.sleep(0.02)  # the unit is still being written when the interrupts land
        if restoring:
            late.append(index)
        write(buffer, index, tensor)

    def noted_restore(store) -> None:
        restoring.append(True)
        restore(store)

    def interrupted(futures, **kwargs):
        waits.append(kwargs)
        writing.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(host_store.HostBuffer, "write", slow_write)
    monkeypatch.setattr(host_store.HostStore, "restore", noted_restore)
    monkeypatch.setattr(host_store, "wait", interrupted)
    model = make_dit()
    before = pipeline_state(model)
    with pytest.raises(KeyboardInterrupt):
        dispatch_pipeline(model, "model", "cpu")
    time.sleep(0.5)  # a thread still packing, had it been left to, has finished by now
    assert late == [], "the unit was still being written while the restore ran"
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())
    assert_restored(model, before)
    assert len(waits) == 2
