"""Config migrations change old defaults only, keep comments, and leave the file valid TOML."""

from __future__ import annotations

from agent.config_migrate import Migration, migrate_text

OLD = '''# my line
[line]
site = "HKG"
[vision]
mode = "required"   # keep me
model = "/opt/sortgate/models/xray_int8.tflite"   # the model
'''


def test_an_old_default_is_rewritten_in_place_with_its_comment() -> None:
    out, changes = migrate_text(OLD)
    assert 'model = "xray_int8.tflite"   # the model\n' in out
    assert out.replace('"xray_int8.tflite"', '"/opt/sortgate/models/xray_int8.tflite"') == OLD
    assert len(changes) == 1 and changes[0].startswith("vision.model:")


def test_a_value_the_technician_chose_and_other_sections_are_left_alone() -> None:
    own = OLD.replace("/opt/sortgate/models/xray_int8.tflite", "/srv/models/ours.tflite")
    assert migrate_text(own) == (own, [])
    other = OLD.replace("[vision]", "[other]")  # the same key and value in another table
    assert migrate_text(other) == (other, [])
    assert migrate_text("")[1] == []


def test_a_migration_of_a_number_and_the_result_is_still_toml() -> None:
    m = (Migration("9.9", "controller", "poll_interval_ms", 4, 5, "test"),)
    out, changes = migrate_text("[controller]\npoll_interval_ms = 4\nidle_poll_ms = 4\n", m)
    assert out == "[controller]\npoll_interval_ms = 5\nidle_poll_ms = 4\n" and len(changes) == 1
