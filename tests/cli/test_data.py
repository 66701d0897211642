import json

import pytest

from qlora_fast.cli.config import ConfigError, parse_config
from qlora_fast.cli.data import load_training_data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_column_names_the_key_to_set(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": path, "type": "prompt_completion"}]})
    with pytest.raises(ConfigError, match="no column 'prompt'.*\\['question', 'answer'\\].*prompt_column"):
        load_training_data(cfg)


def test_column_mapping_and_csv(tmp_path):
    (tmp_path / "d.csv").write_text("question,answer\nq1,a1\nq2,a2\n")
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [
        {"path": str(tmp_path / "d.csv"), "type": "prompt_completion", "prompt_column": "question",
         "completion_column": "answer"}]})
    train, val = load_training_data(cfg)
    assert val is None and train[0] == {"prompt": "q1", "completion": "a1"}


def test_chat_keeps_loss_on_last_assistant_turn_unless_train_on_inputs(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}] * 4)
    spec = [{"path": path, "type": "messages"}]
    train, _ = load_training_data(parse_config({"base_model": "random:tiny-llama", "datasets": spec}))
    assert train[0] == {"prompt": turns[:1], "completion": turns[1:]}
    train, _ = load_training_data(parse_config({"base_model": "random:tiny-llama", "datasets": spec,
                                                "train_on_inputs": True}))
    assert train[0] == {"messages": turns}


def test_val_split_and_mixed_kinds(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    train, val = load_training_data(parse_config({"base_model": "random:tiny-llama", "datasets": [a],
                                                  "val_set_size": 0.2}))
    assert len(train) == 8 and len(val) == 2
    with pytest.raises(ConfigError, match="mix record kinds"):
        load_training_data(parse_config({"base_model": "random:tiny-llama", "datasets": [
            a, {"path": b, "type": "prompt_completion"}]}))


def test_empty_dataset_file_is_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": str(tmp_path / "d.jsonl"),
                                                                         "type": "text"}]})
    with pytest.raises(ConfigError, match="d.jsonl' is empty"):
        load_training_data(cfg)


def test_unreadable_dataset_file_is_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text("{not json\n")
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": str(tmp_path / "d.jsonl"),
                                                                         "type": "text"}]})
    with pytest.raises(ConfigError, match="cannot load dataset") as caught:
        load_training_data(cfg)
    assert "\n" not in str(caught.value)


def test_dataset_without_usable_rows_names_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": path, "type": "text"}]})
    with pytest.raises(ConfigError, match="none of its 2 rows has text in every column"):
        load_training_data(cfg)


def test_alpaca_records_become_prompt_and_completion(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 + 2", "output": "4"},
                                              {"instruction": "Say hi.", "input": "", "output": "hi"}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": path, "type": "alpaca"}]})
    train, _ = load_training_data(cfg)
    with_input, without = train[0], train[1]
    assert with_input["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n")
    assert "paired with an input" in with_input["prompt"] and with_input["completion"] == "4"
    assert without["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input" not in without["prompt"] and without["completion"] == "hi"


def test_alpaca_without_output_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "response": "4"}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": path, "type": "alpaca"}]})
    with pytest.raises(ConfigError, match="no column 'output'.*'instruction' and 'output'"):
        load_training_data(cfg)


def test_axolotl_chat_template_entries_read_their_messages_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "hello"}]}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [
        {"path": path, "type": "chat_template", "field_messages": "conversations", "roles_to_train": None}]})
    train, _ = load_training_data(cfg)
    assert train[0]["completion"] == [{"role": "assistant", "content": "hello"}]


def test_sharegpt_turns_mapped_as_axolotl_entries_say(tmp_path):
    """axolotl's chat_template entry over ShareGPT records: from/value turns, human/gpt roles, the system
    turn dropped where asked; a mapping that names no key of the turns is one line."""
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    entry = {"path": path, "type": "chat_template", "field_messages": "conversations", "drop_system_message": True,
             "message_property_mappings": {"role": "from", "content": "value"}}
    train, _ = load_training_data(parse_config({"base_model": "random:tiny-llama", "datasets": [entry]}))
    assert train[0] == {"prompt": [{"role": "user", "content": "hi"}],
                        "completion": [{"role": "assistant", "content": "yo"}]}
    kept = parse_config({"base_model": "random:tiny-llama", "train_on_inputs": True,
                         "datasets": [{**entry, "drop_system_message": False}]})
    assert [t["role"] for t in load_training_data(kept)[0][0]["messages"]] == ["system", "user", "assistant"]
    wrong = parse_config({"base_model": "random:tiny-llama",
                          "datasets": [{**entry, "message_property_mappings": {"role": "speaker"}}]})
    with pytest.raises(ConfigError, match="a turn has no key 'speaker' or 'content'"):
        load_training_data(wrong)
    with pytest.raises(ConfigError, match="message_property_mappings maps role and content"):
        parse_config({"base_model": "random:tiny-llama",
                      "datasets": [{**entry, "message_property_mappings": {"speaker": "from"}}]})


def test_axolotl_sharegpt_type_reads_conversations_of_from_value_turns(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    cfg = parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": path, "type": "sharegpt"}]})
    assert load_training_data(cfg)[0][0] == {"prompt": [{"role": "user", "content": "hi"}],
                                              "completion": [{"role": "assistant", "content": "yo"}]}
